"""The statement filter of the read-only query surface: one SELECT, or EXPLAIN of one.

The first line of defence; below it the connection itself is locked down
(``Store._lock_down``: no external access outside the store, no settings changes).
"""

from __future__ import annotations

import re

import duckdb

from arrakis_ray.errors import QueryError

# Prefix of EXPLAIN [ANALYZE] [(options)] after leading whitespace and comments.
_EXPLAIN = re.compile(
    r"^(?:\s+|--[^\n]*\n|/\*.*?\*/)*EXPLAIN\s*(?:\([^)]*\)\s*)?(?:ANALY[SZ]E\b)?",
    re.IGNORECASE | re.DOTALL,
)


def check_read_only(con: duckdb.DuckDBPyConnection, query: str) -> None:
    """Refuse anything but one SELECT, or EXPLAIN of one (QueryError)."""
    try:
        statements = con.extract_statements(query)
    except duckdb.Error as e:
        raise QueryError(str(e)) from None
    if len(statements) != 1:
        raise QueryError(
            f"one statement per query, got {len(statements)}" if statements else "empty query"
        )
    st = statements[0]
    if st.type == duckdb.StatementType.EXPLAIN:
        # EXPLAIN ANALYZE runs its statement: only a SELECT may follow.
        m = _EXPLAIN.match(st.query)
        try:
            inner = con.extract_statements(st.query[m.end() :]) if m else []
        except duckdb.Error:
            inner = []
        if len(inner) == 1 and inner[0].type == duckdb.StatementType.SELECT:
            return
        raise QueryError("the query surface is read-only: EXPLAIN only of a SELECT")
    if st.type == duckdb.StatementType.SELECT:
        return
    kind = str(st.type).rsplit(".", 1)[-1]
    raise QueryError(f"the query surface is read-only: {kind} statements are not allowed")
