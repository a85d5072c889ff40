"""``arrakis-ray sql``: read-only SQL over a store, bounded in time, memory and result
size, printed or written to a file outside the store."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

from arrakis_ray.errors import ArrakisError, ConfigError
from arrakis_ray.store.bounds import DEFAULT_MAX_RESULT_BYTES, DEFAULT_TIMEOUT_S, format_size
from arrakis_ray.store.location import is_remote, os_reason, store_path


def add_sql_command(sub) -> None:
    """The ``sql`` subcommand's arguments."""
    q = sub.add_parser("sql", help="query a store with SQL (read-only)")
    q.add_argument("store", help="store directory, or a URI such as s3://bucket/prefix")
    q.add_argument(
        "query",
        nargs="?",
        help="SQL query (views: runs, tokens, vocab, act_*, results_*; macros: neuron, "
        "vectors, top_contexts, ...); none: interactive prompt",
    )
    q.add_argument("--format", choices=["table", "csv", "json", "parquet"], default="table")
    q.add_argument(
        "--out", help="write the result to this file (outside the store) instead of stdout"
    )
    q.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="S",
        help=f"stop a query after S seconds (default {DEFAULT_TIMEOUT_S:g}; 0: no limit)",
    )
    q.add_argument(
        "--memory-limit",
        metavar="SIZE",
        help="memory DuckDB may use, e.g. 4GB or 512MiB (default: a quarter of this "
        "machine's memory); it spills up to twice as much to disk",
    )
    q.add_argument(
        "--max-result",
        default=format_size(DEFAULT_MAX_RESULT_BYTES).replace(" ", ""),
        metavar="SIZE",
        help="refuse a result larger than SIZE (default %(default)s; 0: no limit)",
    )
    q.set_defaults(func=cmd_sql)


def cmd_sql(args) -> None:
    from arrakis_ray.store.catalog import Store
    from arrakis_ray.store.formatting import format_frame

    out_file = _out_file(args.out, args.store) if args.out and args.query is not None else None
    bounds = {
        "timeout_s": args.timeout or None,
        "memory_limit": args.memory_limit,
        "max_result_bytes": None if args.max_result.strip() in ("0", "0B") else args.max_result,
    }
    with Store(args.store, **bounds) as db:
        if args.query is None:
            _sql_prompt(db, args.format)
            return
        frame = db.sql(args.query)
    out = format_frame(frame, args.format)
    if out_file is not None:
        _write_out(out_file, out if isinstance(out, bytes) else out.encode(), args.out)
        print(f"{frame.height} rows -> {args.out}")
    elif isinstance(out, bytes):
        sys.stdout.buffer.write(out)
    else:
        print(out)


def _out_file(out: str, store: str) -> Path:
    """The file ``sql --out`` names, resolved (symbolic links followed); ConfigError if it
    lies inside the store (a query would overwrite the data it reads), is a directory, or
    its directory does not exist."""
    path = Path(out).expanduser().resolve()
    root = store_path(store)
    if not is_remote(root):
        root = root.resolve()
        # by name, and by identity for what names hide (a bind mount, a case-blind disk)
        inside = path == root or root in path.parents
        if not inside and root.is_dir():
            inside = any(p.exists() and p.samefile(root) for p in path.parents)
        if inside:
            raise ConfigError(f"--out {out}: inside the store {root}; write the result elsewhere")
    if path.is_dir():
        raise ConfigError(f"--out {out}: is a directory; name a file")
    if not path.parent.is_dir():
        reason = "is a file" if path.parent.exists() else "does not exist"
        raise ConfigError(f"--out {out}: the directory {path.parent} {reason}")
    return path


def _write_out(path: Path, data: bytes, given: str) -> None:
    """Write ``data`` to ``path`` through a temp file renamed over it: a hard link to a
    store file is replaced, not written through, and a failed write leaves no half file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:  # "x": never through an existing name; mode from umask
            f.write(data)
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"--out {given}: cannot write it: {os_reason(path, exc)}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _sql_prompt(db, fmt: str) -> None:
    """A small REPL: statements end with ';', errors are printed and the prompt goes on."""
    from arrakis_ray.store.formatting import format_frame

    if fmt == "parquet":
        fmt = "table"  # binary output makes no sense on a terminal
    print(f"arrakis-ray sql on {db.root} - views: {', '.join(db.views())}")
    print("End statements with ';'. Ctrl-D quits.")
    buffer: list[str] = []
    while True:
        try:
            line = input("sql> " if not buffer else "...> ")
        except EOFError:
            print()
            return
        buffer.append(line)
        if not line.rstrip().endswith(";"):
            continue
        query = "\n".join(buffer).rstrip().rstrip(";")
        buffer = []
        try:
            print(format_frame(db.sql(query), fmt))
        except ArrakisError as exc:
            print(f"error: {exc}")
