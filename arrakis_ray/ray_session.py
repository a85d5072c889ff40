"""One way to use Ray: connect once, keep Ray's own chatter in a log file, and turn a
failure inside a Ray task into one line.

Every driver (the harvest, the tool runner) calls ``ensure_ray()`` before its first
Ray call and wraps its Ray calls in ``ray_errors(what)``:

- an ``ArrakisError`` raised inside a task (a bad shard, a tool's ``ToolError``) comes
  back as itself, with its own one-line message, whether Ray kept the exception object
  (plain ``@ray.remote`` tasks: ``RayTaskError.cause``) or only its text (Ray Data
  steps, where ``UserCodeException`` carries the original in the remote traceback);
- any other exception inside a task (a bug, a ``ValueError``, an actor killed for
  memory) becomes one ``RemoteTaskError`` naming the task and the exception's type and
  message; the full remote traceback goes to the log file;
- either way the message is one line, whatever the task's exception held.

Ray's own log lines (connection, token authentication, Ray Data's execution plan and
issue detector) go to that log file too, not to the console: ``log_file()``.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from pathlib import Path

from arrakis_ray.errors import ArrakisError, ClusterError, RemoteTaskError

log = logging.getLogger(__name__)

LOG_DIR_ENV = "ARRAKIS_RAY_LOG_DIR"  # where log files go (default: <tmp>/arrakis-ray/logs)

# Python loggers whose console output is Ray's, not ours. "ray.data" does not propagate
# to "ray" (Ray Data configures it so), hence both.
_RAY_LOGGERS = ("ray", "ray.data")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# "module.Name: message" lines of a remote traceback, innermost first
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.*)$", re.MULTILINE)
_TASK = re.compile(r"^ray::(.+?)(?: \(pid=|$)", re.MULTILINE)


@cache
def log_file() -> Path:
    """This process's log file for Ray's messages and remote tracebacks.

    One file per process, in ``$ARRAKIS_RAY_LOG_DIR`` or ``<tmp>/arrakis-ray/logs``:
    never inside the store, which an error must leave untouched and which may be an
    object-store URI.
    """
    directory = Path(
        os.environ.get(LOG_DIR_ENV) or Path(tempfile.gettempdir()) / "arrakis-ray" / "logs"
    )
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"


@cache
def _file_handler() -> logging.Handler:
    handler = logging.FileHandler(log_file(), delay=True, encoding="utf-8")
    handler.setLevel(logging.INFO)  # Ray Data's DEBUG records stay in its session log
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    return handler


@cache
def _trace_log() -> logging.Logger:
    """A logger that writes only to the log file (remote tracebacks)."""
    logger = logging.getLogger("arrakis_ray.remote_tracebacks")
    logger.propagate = False
    logger.addHandler(_file_handler())
    return logger


def route_ray_logging() -> None:
    """Send Ray's Python log records (core and Ray Data) to ``log_file()``, not the console.

    Ray installs a stderr handler on its ``ray`` logger when imported, Ray Data one on
    ``ray.data``; they are replaced by the log file's handler. Ray Data's own file in
    the session directory stays. Idempotent.
    """
    import ray.data  # noqa: F401  (configures the "ray.data" logger on import)

    handler = _file_handler()
    for name in _RAY_LOGGERS:
        logger = logging.getLogger(name)
        for h in list(logger.handlers):
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                logger.removeHandler(h)
        if handler not in logger.handlers:
            logger.addHandler(handler)


def ensure_ray() -> None:
    """Connect to Ray: ``RAY_ADDRESS`` if set, else start a local cluster.

    Ray's log lines go to ``log_file()``; Ray Data's progress bars show in a terminal
    only (unless ``RAY_DATA_DISABLE_PROGRESS_BARS`` decides).
    """
    import ray
    from ray.data import DataContext

    route_ray_logging()
    if "RAY_DATA_DISABLE_PROGRESS_BARS" not in os.environ:
        # Ray Data's bars in a terminal; in logs and CI our own per-shard lines suffice
        DataContext.get_current().enable_progress_bars = sys.stderr.isatty()
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except Exception as exc:  # ConnectionError, RuntimeError, ValueError, ...
            where = f"the Ray cluster at RAY_ADDRESS={address}" if address else "a local Ray"
            _trace_log().exception("ray.init failed")
            raise ClusterError(
                f"cannot start or reach {where}: {type(exc).__name__}: "
                f"{_first_line(_ANSI.sub('', str(exc)))} "
                f"(details in {log_file()})"
            ) from None


def user_error(exc: BaseException) -> ArrakisError | None:
    """The ArrakisError behind a failure in a Ray task or actor, if there is one.

    A plain task's ``RayTaskError`` keeps the original exception as ``.cause`` (and is
    itself an instance of the cause's class, with the whole coloured traceback as its
    message: never shown as is). A Ray Data step's failure is a ``UserCodeException``,
    and an actor whose constructor raised dies with an ``ActorDiedError``: in both the
    original survives only as text in the remote traceback; there the last arrakis
    exception named that is not Ray's own wrapper is the outermost, the step's.
    """
    from ray.exceptions import RayActorError, RayTaskError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, RayTaskError):
            cause = exc.cause
            if isinstance(cause, ArrakisError) and not isinstance(cause, RayTaskError):
                return cause
            named = _named_error(str(exc))
            if named is not None:
                return named
            exc = cause
        elif isinstance(exc, ArrakisError):
            return exc
        elif isinstance(exc, RayActorError) and _named_error(str(exc)) is not None:
            return _named_error(str(exc))  # the actor's constructor raised it
        else:
            exc = getattr(exc, "cause", None) or exc.__cause__
    return None


def _named_error(text: str) -> ArrakisError | None:
    """The outermost ``arrakis_ray.errors`` exception a remote traceback names, rebuilt
    from its message line."""
    from arrakis_ray import errors

    found = _remote_exceptions(_ANSI.sub("", text))
    if not found:
        return None
    module, _, name = found[-1][0].rpartition(".")
    cls = getattr(errors, name, None) if module == "arrakis_ray.errors" else None
    if isinstance(cls, type) and issubclass(cls, ArrakisError):
        return cls(found[-1][1].strip())
    return None


def one_line_error(exc: BaseException, what: str) -> ArrakisError | None:
    """``exc`` from a Ray call as a one-line ArrakisError, or None if Ray played no part.

    ``what`` names the work that failed (``"harvest of run 1a2b"``, ``"tool logit_lens"``)
    and prefixes the message. A non-Arrakis failure's full traceback goes to the log file.
    """
    from ray.exceptions import RayError

    # Ray's error may sit behind the one raised (``raise ToolError(...) from ray_error``)
    exc = next((e for e in _explicit_causes(exc) if isinstance(e, RayError)), None)
    if exc is None:
        return None
    cause = user_error(exc)
    if cause is not None:
        # a task's message may span lines (pyarrow's and polars' often do): one line
        message = f"{what} failed: {one_line(str(cause))}"
        try:
            return type(cause)(message)
        except TypeError:  # a user's error class with another signature
            return ArrakisError(message)
    text = _ANSI.sub("", str(exc))
    _trace_log().error("%s failed in a Ray task:\n%s", what, text)
    task = _TASK.search(text)
    kind, message = _root_exception(exc, text)
    where = f" in task {task.group(1)}" if task else ""
    return RemoteTaskError(f"{what} failed{where}: {kind}: {message} (traceback in {log_file()})")


@contextmanager
def ray_errors(what: str) -> Iterator[None]:
    """Re-raise what fails inside the Ray calls of the block as ``one_line_error``."""
    try:
        yield
    except Exception as exc:
        error = one_line_error(exc, what)
        if error is None:
            raise
        raise error from None


def _root_exception(exc: BaseException, text: str) -> tuple[str, str]:
    """(type name, first line of message) of the user's exception inside a Ray error."""
    from ray.exceptions import RayError, RayTaskError, UserCodeException

    cause = exc.cause if isinstance(exc, RayTaskError) else exc
    if not isinstance(cause, RayError | UserCodeException):
        return type(cause).__name__, _first_line(str(cause))
    found = _remote_exceptions(text)  # only text is left (a Ray Data step)
    if found:
        name, message = found[-1]
        return name.rsplit(".", 1)[-1], _first_line(message)
    return type(cause).__name__, _first_line(str(cause))


def _remote_exceptions(text: str) -> list[tuple[str, str]]:
    """(qualified name, message) of each exception in a remote traceback, innermost
    first, without Ray's own wrappers (``ray.exceptions.UserCodeException``...)."""
    return [
        (name, message)
        for name, message in _EXCEPTION_LINE.findall(text)
        if not name.startswith("ray.") and ("Error" in name or "Exception" in name)
    ]


def _explicit_causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and its ``raise ... from`` causes, outermost first."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__


def one_line(text: str) -> str:
    """``text`` without ANSI codes, its lines joined by spaces."""
    lines = (line.strip() for line in _ANSI.sub("", text).splitlines())
    return " ".join(line for line in lines if line)


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


def native_stderr_to_log() -> Path:
    """Send what native code writes to file descriptor 2 to ``log_file()``; Python's
    ``sys.stderr`` stays on the console.

    For the ``arrakis-ray`` process only (it owns its file descriptors): Ray's C++ core
    worker in the driver prints warnings there that Python logging cannot route, such
    as the one that every Ray Data actor pool triggers ("constructor arguments in the
    object store and max_restarts > 0": Ray Data itself passes its DataContext and the
    step as object references, and restarts our actors when they die). Those lines are
    in Ray's session logs as well.
    """
    path = log_file()
    sys.stderr.flush()
    console = os.dup(2)
    target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 2)
    os.close(target)
    sys.stderr = open(  # lives as long as the process
        console,
        "w",
        buffering=1,
        encoding=sys.stderr.encoding,
        errors="backslashreplace",
    )
    return path
