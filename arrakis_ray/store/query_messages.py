"""DuckDB's error messages as one line, without hints the read-only surface refuses.

DuckDB answers a bad query with several lines: the error, a ``LINE n`` excerpt with a
caret, and hints such as "Use SET max_expression_depth" or "union_by_name=True" that
name commands or options a locked-down Store refuses. A QueryError is one line: the
first meaningful line, the excerpt squashed into it, the refused hints dropped.
"""

from __future__ import annotations

import re


def strip_kind(line: str) -> str:
    """``line`` without DuckDB's ``Out of Memory Error: `` prefix."""
    return re.sub(r"^[A-Za-z ]*Error:\s*", "", line)


# a DuckDB hint that names a command or option the read-only surface refuses (but not
# our own "LOAD statements are not allowed")
_FORBIDDEN = re.compile(
    r"\b(?:SET|RESET|PRAGMA|INSTALL|LOAD|CALL)\s+(?!statements\b)[\w'\"`<]"
    r"|union_by_name|max_expression_depth"
)
# "..., or SET x=false to ...": the clause goes, the rest of its sentence stays
_FORBIDDEN_CLAUSE = re.compile(r",?\s+(?:or|and)\s+(?:SET|PRAGMA|RESET)\s+[^.]*\.?\s*$")
# "Please try installing and loading the excel extension:" -> what is true here instead
_EXTENSION_HINT = re.compile(r"\binstall(?:ing)?\b.*\bload(?:ing)?\b", re.IGNORECASE)
NO_EXTENSIONS = "Extensions cannot be installed or loaded on the read-only query surface."
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'*])")
_CONTEXT_WIDTH = 60  # characters of the query shown around a caret


def one_line(message: str) -> str:
    """DuckDB's message as one line, without hints the read-only surface cannot follow.

    Keeps the first line and the short explanations after it ("Candidate bindings: ...",
    "Did you mean ...?"); the ``LINE n: <query>`` and caret lines become ``(LINE n, column c:
    "...")``
    around the caret; "Possible solutions" lists and "See also" links go.
    """
    lines = message.strip().splitlines()
    kept: list[str] = []
    for i, raw in enumerate(lines):
        line = raw.strip()
        if not line or _is_caret(line) or line.startswith(("*", "See also", "Possible solutions")):
            continue
        if re.match(r"^LINE \d+:", line):
            caret = lines[i + 1] if i + 1 < len(lines) and _is_caret(lines[i + 1]) else None
            kept.append(_context(raw, caret))
            continue
        line = _without_forbidden(line)
        if line and line not in kept:  # the extension hint may come twice
            kept.append(line)
    return " ".join(kept) if kept else "query failed (DuckDB gave no message)"


def _is_caret(line: str) -> bool:
    return bool(line.strip()) and set(line.strip()) == {"^"}


def _without_forbidden(line: str) -> str:
    sentences = []
    for sentence in _SENTENCE_END.split(line):
        if _EXTENSION_HINT.search(sentence):
            sentence = NO_EXTENSIONS
        elif _FORBIDDEN.search(sentence):
            sentence = _FORBIDDEN_CLAUSE.sub(".", sentence)
            if _FORBIDDEN.search(sentence):
                continue
        sentences.append(sentence)
    return " ".join(sentences).strip()


def _context(line: str, caret: str | None) -> str:
    """``(LINE N, column C: "…query text…")`` from DuckDB's ``LINE N: <query text>`` and
    caret lines, the text cut to ``_CONTEXT_WIDTH`` characters around the caret."""
    located = re.match(r"^(\s*LINE (\d+):\s?)(.*)$", line)
    prefix, number, text = len(located.group(1)), located.group(2), located.group(3)
    column = max(0, caret.index("^") - prefix) if caret else 0
    start = max(0, min(column - _CONTEXT_WIDTH // 2, len(text) - _CONTEXT_WIDTH))
    snippet = text[start : start + _CONTEXT_WIDTH].strip()
    snippet = ("…" if start > 0 else "") + snippet
    snippet += "…" if start + _CONTEXT_WIDTH < len(text) else ""
    where = f"LINE {number}, column {column + 1}" if caret else f"LINE {number}"
    return f'({where}: "{snippet}")'


# -- the temp directory -------------------------------------------------------------------
