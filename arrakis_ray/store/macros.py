"""The catalog's SQL table macros: the everyday questions as one call each.

``SELECT * FROM top_contexts('mlp_post', 2, 7, 20)`` and friends; ``Store.macros()``
lists them and ``schemas/README.md`` documents them. Each entry says which views it
reads, so a store without those views simply lacks the macro.
"""

from __future__ import annotations

from arrakis_ray.store.layout import BLOCK_DIMS

# The macros: (name, call and meaning, views it reads, body).
# Column references are qualified (a.layer): a macro parameter shadows a column of the
# same name. ``family`` picks the view act_<family> at call time (query_table / query),
# so a macro binds only the views it names, created when those exist. A dense family's
# view holds column blocks of BLOCK_DIMS dimensions (schemas/README.md): dimension i is
# column d<i % BLOCK_DIMS> of block i // BLOCK_DIMS, and a filter on block and layer
# opens only that block's files. ``_width``, ``_max_width``, ``_runs_with`` and ``_view``
# come from the runs' manifests (``helper_macros``): a vector type needs its width as
# text (FLOAT[n]), so vectors() and cosine_topk() build their queries as strings, and
# ``_view`` lets only a stored family's view name into them.
Q = "'"  # a quote inside the SQL strings built below
_RUN = f"coalesce(' AND a.run_id = {Q * 3} || replace(run_id, {Q * 4}, {Q * 6}) || {Q * 4}, '')"
_WHERE = f"coalesce(' AND a.layer = ' || layer::INTEGER, '') || {_RUN}"
_DIMS = f"[*COLUMNS({Q * 2}^d[0-9]+${Q * 2})]"  # a row's d columns as a list, in order
_N = "coalesce(width, _width(family, run_id))"
# (concatenating NULL gives NULL: the text is NULL when the width is unknown)
_VECTOR_ERROR = (  # _view() raises first for a family the store does not hold
    "'vectors(): the runs of this store hold ' || _view(family) || ' at several widths: "
    "give width := n or run_id := a run'"
)
_VECTOR = f"""
    'SELECT a.run_id, a.layer, a.seq_id, a.pos, list_slice(' || CASE
        WHEN {_N} <= {BLOCK_DIMS} THEN '{_DIMS}'
        ELSE 'flatten(list({_DIMS} ORDER BY a.block))'
        END
    || ', 1, ' || {_N} || ')::FLOAT[' || {_N} || '] AS vec'
    || ' FROM ' || _view(family) || ' a WHERE true' || {_WHERE} || _runs_with(family, {_N})
    || CASE WHEN {_N} > {BLOCK_DIMS} THEN ' GROUP BY ALL' ELSE '' END
"""
# Cosine without building whole vectors: each block gives, per token, its part of the
# dot product and of the squared norm (array_inner_product on FLOAT[m] arrays of that
# block's m real columns), and the blocks are joined on the token's keys. Measured at
# width 4,096 on 200k rows (benchmarks/BENCHMARKS.md, "Wide layouts"): 0.72x a pyarrow ->
# numpy scan, where one FLOAT[4096] array of all columns took 6x and per-block rows
# summed by GROUP BY 1.55x. Block b's subquery is built as text from ``b``; its slice of
# the direction goes in as one string cast to FLOAT[m]: DuckDB takes ~0.45 s to parse a
# list literal of 4,096 numbers, and ~0.005 s to cast a string holding it (which is why
# ``direction`` may also be given as such a string).
_D = "direction::DOUBLE[]"
_NB = f"((len({_D}) + {BLOCK_DIMS - 1}) // {BLOCK_DIMS})"
_M = f"least({BLOCK_DIMS}, len({_D}) - b * {BLOCK_DIMS})"  # real columns of block b
_BLOCK_PART = f"""
    '(SELECT a.run_id, a.seq_id, a.pos, array_inner_product(a.x, {Q * 3}
    || list_slice({_D}, b * {BLOCK_DIMS} + 1, (b + 1) * {BLOCK_DIMS})::VARCHAR
    || '{Q * 2}::FLOAT[' || {_M} || ']) AS dot, array_inner_product(a.x, a.x) AS sq FROM '
    || '(SELECT a.run_id, a.seq_id, a.pos, ['
    || array_to_string(list_transform(range({_M}), lambda j: 'a.d' || j), ', ')
    || ']::FLOAT[' || {_M} || '] AS x FROM ' || _view(family) || ' a WHERE a.block = ' || b
    || ' AND a.layer = ' || layer::INTEGER || {_RUN} || _runs_with(family, len({_D}))
    || ') a) AS t' || b
    || CASE WHEN b = 0 THEN '' ELSE ' ON t' || b || '.run_id = t0.run_id AND t' || b
        || '.seq_id = t0.seq_id AND t' || b || '.pos = t0.pos' END
"""
_COSINE_ERROR = "'cosine_topk(): give one layer (a number), not NULL'"
_COSINE = f"""
    'SELECT t0.run_id, t0.seq_id, t0.pos, ('
    || array_to_string(list_transform(range({_NB}), lambda b: 't' || b || '.dot'), ' + ')
    || ') / sqrt('
    || array_to_string(list_transform(range({_NB}), lambda b: 't' || b || '.sq'), ' + ')
    || ') / ' || sqrt(list_sum(list_transform({_D}, lambda x: x * x)))
    || ' AS cosine FROM '
    || array_to_string(list_transform(range({_NB}), lambda b: {_BLOCK_PART}), ' JOIN ')
"""
MACROS: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    (
        "neuron",
        "neuron(family, layer, i, run_id := NULL): dimension i of act_<family> as rows "
        "(run_id, layer, seq_id, pos, value) at layer (NULL: every layer); reads only the "
        "files of that dimension's block",
        (),
        f"""
        SELECT n.* FROM (
            SELECT a.run_id, a.layer, a.seq_id, a.pos,
                   COLUMNS('^d' || (i % {BLOCK_DIMS})::VARCHAR || '$')::FLOAT AS value
            FROM query_table(CASE WHEN i < 0 OR i >= _max_width(family)
                THEN error('neuron(): ' || family || ' has dimensions 0 .. '
                    || (_max_width(family) - 1) || ', not ' || i)
                ELSE 'act_' || family END) a
            WHERE a.block = i // {BLOCK_DIMS}
              AND (layer IS NULL OR a.layer = layer) AND (run_id IS NULL OR a.run_id = run_id)
        ) n
        WHERE n.value IS NOT NULL  -- padding, or a narrower run's missing column
        """,
    ),
    (
        "vectors",
        "vectors(family, layer, run_id := NULL, width := NULL): one row per token of "
        "act_<family> at layer (NULL: every layer) with its whole vector vec FLOAT[width]; "
        "width picks the runs of that width when the store holds several",
        (),
        f"SELECT * FROM query(coalesce({_VECTOR}, error({_VECTOR_ERROR})))",
    ),
    (
        "top_contexts",
        "top_contexts(family, layer, neuron, k, run_id := NULL): the k tokens with the "
        "largest value of dimension neuron of act_<family> at layer (ties: run_id, seq_id, "
        "pos ascending); reads only that dimension's column",
        ("tokens",),
        """
        WITH top AS (
            SELECT n.run_id, n.seq_id, n.pos, n.value AS activation
            FROM neuron(family, layer, neuron, run_id := run_id) n
            ORDER BY activation DESC, n.run_id, n.seq_id, n.pos
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
        "cosine_topk(family, layer, direction, k, run_id := NULL): the k tokens whose "
        "act_<family> vector at layer has the largest cosine with direction (a list of n "
        "numbers, or a string '[0.1, ...]': faster to parse for thousands); runs whose "
        "width is not n are skipped",
        ("tokens",),
        f"""
        WITH top AS (
            SELECT q.* FROM query(coalesce({_COSINE}, error({_COSINE_ERROR}))) q
            WHERE q.cosine IS NOT NULL
            ORDER BY q.cosine DESC, q.run_id, q.seq_id, q.pos
            LIMIT k
        )
        SELECT top.run_id, top.seq_id, top.pos, t.token_text, top.cosine::FLOAT AS cosine
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
        SELECT v.layer,
               sqrt(list_sum(list_transform(v.vec::FLOAT[], lambda x: x::DOUBLE * x))) AS norm,
               list_select(v.vec::FLOAT[], list_transform(dims, lambda i: i + 1)) AS dim_values
        FROM vectors(family, NULL, run_id := run_id) v
        WHERE v.seq_id = seq_id AND v.pos = pos
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


def helper_macros(widths: dict[str, dict[str, int | None]]) -> list[str]:
    """Scalar macros from the manifests (family -> run id -> width):
    ``_width(family, run_id)``, the run's width (run_id NULL: the width every run of the
    store has, else NULL); ``_max_width(family)``; ``_runs_with(family, n)``, a WHERE
    clause (text) keeping the runs whose family has width n; ``_view(family)``, the view's
    name, or an error naming the stored families."""
    unique, per_run, runs_with = [], [], []
    for family, runs in sorted(widths.items()):
        found = set(runs.values())
        if len(found) == 1 and None not in found:
            unique.append(f"WHEN '{family}' THEN {found.pop()}")
        for run_id, width in sorted(runs.items()):
            if width is not None:
                per_run.append(f"WHEN '{family}/{run_id}' THEN {width}")
        for width in sorted(w for w in set(runs.values()) if w is not None):
            ids = sorted(r for r, w in runs.items() if w == width)
            keep = "" if len(ids) == len(runs) else _in_list(ids)
            runs_with.append(f"WHEN '{family}/{width}' THEN '{keep}'")
    by_family, by_run = _case("family", unique), _case("family || '/' || run_id", per_run)
    widest = [
        f"WHEN '{f}' THEN {max(w for w in runs.values() if w is not None)}"
        for f, runs in sorted(widths.items())
        if any(w is not None for w in runs.values())
    ]
    stored = ", ".join(sorted(widths)) or "none"
    views = [f"WHEN '{f}' THEN 'act_{f}'" for f in sorted(widths)]
    unknown = f"error('no activations of family ' || family || ' in this store (stored: {stored})')"
    cases = {
        "_width(family, run_id)": f"CASE WHEN run_id IS NULL THEN {by_family} ELSE {by_run} END",
        "_max_width(family)": _case("family", widest),
        "_runs_with(family, n)": _case("family || '/' || n", runs_with, "' AND false'"),
        "_view(family)": _case("family", views, unknown),
    }
    return [f"CREATE MACRO {call} AS {body}" for call, body in cases.items()]


def _case(key: str, whens: list[str], default: str = "NULL") -> str:
    return f"CASE {key} {' '.join(whens)} ELSE {default} END" if whens else default


def _in_list(run_ids: list[str]) -> str:
    """`` AND a.run_id IN ('a', 'b')`` as the text of a SQL string literal."""
    quoted = ", ".join(f"''{r}''" for r in run_ids)  # run ids: letters, digits, . _ -
    return f" AND a.run_id IN ({quoted})"
