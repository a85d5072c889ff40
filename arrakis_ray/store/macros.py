"""The catalog's SQL table macros: the everyday questions as one call each.

``SELECT * FROM top_contexts('mlp_post', 2, 7, 20)`` and friends; ``Store.macros()``
lists them and ``schemas/README.md`` documents them. Each entry says which views it
reads, so a store without those views simply lacks the macro.
"""

from __future__ import annotations

# The macros: (name, call and meaning, views it reads, body).
# Column references are qualified (a.layer): a macro parameter shadows a column of the
# same name. ``family`` picks the view act_<family> at call time (query_table / query),
# so a macro binds only the views it names, created when those exist.
_VEC = "array_to_string(list_transform(range(len(direction)), lambda i: 'd' || i), ', ')"
MACROS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    (
        "top_contexts",
        "top_contexts(family, layer, neuron, k, run_id := NULL): the k tokens with the "
        "largest value of column d<neuron> of act_<family> at layer (ties: run_id, seq_id, "
        "pos ascending); reads only that column",
        ("tokens",),
        """
        WITH top AS (
            SELECT a.run_id, a.seq_id, a.pos,
                   COLUMNS('^d' || neuron::VARCHAR || '$')::FLOAT AS activation
            FROM query_table('act_' || family) a
            WHERE a.layer = layer AND (run_id IS NULL OR a.run_id = run_id)
            ORDER BY activation DESC, a.run_id, a.seq_id, a.pos
            LIMIT k
        )
        SELECT top.run_id, top.seq_id, top.pos, t.token_text, top.activation
        FROM top LEFT JOIN tokens t
            ON t.run_id = top.run_id AND t.seq_id = top.seq_id AND t.pos = top.pos
        ORDER BY top.activation DESC, top.run_id, top.seq_id, top.pos
        """,
    ),
    (
        "cosine_topk",
        "cosine_topk(family, layer, direction, k, run_id := NULL): the k tokens whose vector "
        "(d0..d{n-1} as FLOAT[n], n = len(direction)) has the largest cosine with direction; "
        "rows of runs whose width is not n are skipped",
        ("tokens",),
        # The width is a type parameter (FLOAT[n]), so the query is built as text; the
        # direction goes in as its own FLOAT[] literal. In a view over runs of several
        # widths, a run wider than n has a non-null d<n>, a narrower one a null d<n-1>.
        f"""
        WITH top AS (
            SELECT q.* FROM query(
                'SELECT a.run_id, a.seq_id, a.pos, array_cosine_similarity(['
                || {_VEC} || ']::FLOAT[' || len(direction) || '], '
                || direction::FLOAT[]::VARCHAR || '::FLOAT[' || len(direction) || ']) AS cosine'
                || ' FROM act_' || family || ' a WHERE a.layer = ' || layer::INTEGER
                || ' AND a.d' || (len(direction) - 1) || ' IS NOT NULL'
                || ' AND list_count([*COLUMNS(lambda c: c IN (''pos'', ''d'
                || len(direction) || '''))]) = 1'
            ) q
            WHERE q.cosine IS NOT NULL AND (run_id IS NULL OR q.run_id = run_id)
            ORDER BY q.cosine DESC, q.run_id, q.seq_id, q.pos
            LIMIT k
        )
        SELECT top.run_id, top.seq_id, top.pos, t.token_text, top.cosine
        FROM top LEFT JOIN tokens t
            ON t.run_id = top.run_id AND t.seq_id = top.seq_id AND t.pos = top.pos
        ORDER BY top.cosine DESC, top.run_id, top.seq_id, top.pos
        """,
    ),
    (
        "token_across_layers",
        "token_across_layers(family, run_id, seq_id, pos, dims := []): per layer, the L2 norm "
        "of that token's act_<family> vector and the values of the listed dimensions",
        (),
        """
        SELECT v.layer, sqrt(list_sum(list_transform(v.vec, lambda x: x::DOUBLE * x))) AS norm,
               list_select(v.vec, list_transform(dims, lambda i: i + 1)) AS dim_values
        FROM (
            SELECT a.layer, [*COLUMNS('^d[0-9]+$')]::FLOAT[] AS vec
            FROM query_table('act_' || family) a
            WHERE a.run_id = run_id AND a.seq_id = seq_id AND a.pos = pos
        ) v
        ORDER BY v.layer
        """,
    ),
    (
        "context_window",
        "context_window(run_id, seq_id, pos, width): the tokens from pos - width to "
        "pos + width as one string, the centre token in [brackets], ... where cut",
        ("tokens", "vocab"),
        # Token texts are concatenated when the run's vocabulary carries its own spaces
        # (GPT-2 style ' the'), else joined with a space (word-level vocabularies).
        """
        WITH win AS (
            SELECT t.pos AS p, t.token_text AS text FROM tokens t
            WHERE t.run_id = run_id AND t.seq_id = seq_id
              AND t.pos BETWEEN pos - width AND pos + width
        ), seq AS (
            SELECT max(t.pos) AS last FROM tokens t
            WHERE t.run_id = run_id AND t.seq_id = seq_id
        ), sep AS (
            SELECT CASE WHEN bool_or(regexp_matches(v.token_text, '^ \\S'))
                        THEN '' ELSE ' ' END AS s
            FROM vocab v WHERE v.run_id = run_id
        )
        SELECT run_id::VARCHAR AS run_id, seq_id::BIGINT AS seq_id, pos::INTEGER AS pos,
               CASE WHEN pos - width > 0 THEN '…' || sep.s ELSE '' END
               || string_agg(
                   CASE WHEN win.p = greatest(pos - width, 0) THEN '' ELSE sep.s END
                   || CASE WHEN win.p = pos THEN '[' || win.text || ']' ELSE win.text END,
                   '' ORDER BY win.p)
               || CASE WHEN pos + width < seq.last THEN sep.s || '…' ELSE '' END AS context
        FROM win, seq, sep
        GROUP BY sep.s, seq.last
        HAVING bool_or(win.p = pos)
        """,
    ),
)
