"""Sweeps as Ray Jobs: submit a sweep file to a cluster's Jobs API, and follow it.

A submitted sweep is one Ray Job whose entrypoint is ``arrakis-ray sweep`` itself, run
on the cluster against the same store: the job plans the sweep there and runs only what
is missing. The job's submission id derives from the sweep's content and the store, so
submitting the same sweep twice is a no-op: the Jobs API refuses a second job with an id
it knows (atomically, in the head's key-value store), and that refusal is reported as
"already submitted" with the first job's status. Two schedulers firing the same
schedule at once rely on the same refusal (``schedules.py``).

The job's working directory is uploaded by Ray: it must hold the sweep file, its base
pipeline and every data and prompts file they read (checked here, before anything is
sent). The store is not uploaded: it must be a place every node can reach, an absolute
path on a shared file system or an object-store URI.

Only the HTTP client of Ray's Jobs API is used (``ray.job_submission``): no Ray session
is started here.
"""

from __future__ import annotations

import fnmatch
import hashlib
import logging
import os
import re
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from arrakis_ray.errors import ClusterError
from arrakis_ray.store.location import is_uri, store_path

log = logging.getLogger(__name__)

ID_PREFIX = "arrakis-"  # every job this package submits; `jobs list` shows these
SWEEP_PREFIX = ID_PREFIX + "sweep-"
# never uploaded with a working dir: environments, caches, stores and built sites
EXCLUDES = (
    ".venv",
    "venv",
    ".git",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".ruff_cache",
    "*.egg-info",
    "node_modules",
    "demo_store",
    "site",
    "*.parquet",
)
# settings of the submitting shell that the job needs to open the same s3:// store;
# credentials are not sent: job settings are readable by anyone with the dashboard
FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")
_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


@dataclass(frozen=True)
class Submission:
    """The answer to a submission."""

    submission_id: str
    status: str
    """Either submitted, or already submitted: the cluster knew the id."""
    job_status: str | None = None
    """The job's status on the cluster now (PENDING, RUNNING, SUCCEEDED, ...)."""
    entrypoint: str = ""
    working_dir: str = ""


@dataclass(frozen=True)
class JobState:
    """A job as the cluster reports it."""

    submission_id: str
    status: str
    message: str = ""
    entrypoint: str = ""
    start_time: int | None = None
    """Milliseconds since the epoch (Ray's unit)."""
    end_time: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        """The job has ended (it succeeded, failed or was stopped)."""
        return self.status in _TERMINAL


# -- what is submitted ---------------------------------------------------------------


def canonical_store(store: str | os.PathLike) -> str:
    """The store as a job on the cluster is told it: an object-store URI, or an
    absolute local path; ClusterError for a relative path, whose meaning on the
    cluster's nodes is unknown."""
    text = str(store)
    if is_uri(text):
        return str(store_path(text))
    local = Path(text.removeprefix("file://")).expanduser()
    if not local.is_absolute():
        raise ClusterError(
            f"--store {text}: a relative path cannot be sent to a cluster; give an "
            "absolute path that every node sees (a shared file system), or s3://bucket/prefix"
        )
    return os.path.normpath(local)


def submission_id_for_sweep(sweep, store: str | os.PathLike) -> str:
    """``arrakis-sweep-`` and 16 hex of (sweep id, canonical store): the same sweep
    content into the same store is the same job."""
    text = f"{sweep.sweep_id}\n{canonical_store(store)}"
    return SWEEP_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:16]


def job_files(sweep) -> list[Path]:
    """Every file a job of ``sweep`` reads besides the store (absolute): the sweep
    file, its base pipeline, and the data and prompts files of its points."""
    from arrakis_ray.sweeps.spec import expand

    files = [Path(sweep.source), Path(sweep.base)]
    for point in expand(sweep):
        files.append(Path(point.config.data.path))
        for step in point.config.analyze:
            prompts = step.params.get("prompts") if isinstance(step.params, dict) else None
            if isinstance(prompts, str):
                files.append(Path(prompts))
    return list(dict.fromkeys(f.resolve() for f in files))


def default_working_dir(sweep) -> Path:
    """The smallest directory holding every file of ``job_files``: the least to upload."""
    return Path(os.path.commonpath([f.parent for f in job_files(sweep)]))


def check_working_dir(sweep, working_dir: str | os.PathLike) -> Path:
    """``working_dir`` resolved; ClusterError naming the first file the job needs that
    it does not hold (or that the upload would leave out)."""
    root = Path(working_dir).expanduser().resolve()
    if not root.is_dir():
        raise ClusterError(f"--working-dir {working_dir}: not a directory")
    for path in job_files(sweep):
        if not path.is_relative_to(root):
            raise ClusterError(
                f"--working-dir {root} does not hold {path}, which the sweep {sweep.source} "
                "reads: give a directory that holds the sweep, its base pipeline and their "
                "data files (default: the smallest such directory)"
            )
        rel = PurePosixPath(path.relative_to(root).as_posix())
        pattern = _excluded(rel)
        if pattern:
            raise ClusterError(
                f"{path}: the sweep reads it, but files matching {pattern!r} are not "
                f"uploaded with a working dir; move it out of {rel.parts[0]}"
            )
    return root


def _excluded(rel: PurePosixPath) -> str | None:
    for pattern in EXCLUDES:
        if any(fnmatch.fnmatchcase(part, pattern) for part in rel.parts):
            return pattern
    return None


def sweep_entrypoint(sweep, store: str, working_dir: Path) -> str:
    """The job's shell command: this package's CLI runs the sweep on the cluster."""
    rel = Path(sweep.source).resolve().relative_to(working_dir).as_posix()
    args = ["python", "-m", "arrakis_ray.cli", "sweep", rel, "--store", store]
    return " ".join(shlex.quote(a) for a in args)


def runtime_env(store: str, working_dir: Path) -> dict[str, Any]:
    """The job's runtime environment: the working dir (less ``EXCLUDES``) and a few
    environment variables."""
    env = {"PYTHONUNBUFFERED": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    if is_uri(store):
        env.update({k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)})
    return {"working_dir": str(working_dir), "excludes": list(EXCLUDES), "env_vars": env}


# -- talking to the cluster --------------------------------------------------------


def submit_sweep(
    sweep,
    store: str | os.PathLike,
    address: str,
    working_dir: str | os.PathLike | None = None,
    *,
    submission_id: str | None = None,
    metadata: dict[str, str] | None = None,
) -> Submission:
    """Submit ``sweep`` (a loaded ``Sweep``) as a Ray Job into ``store``.

    ``submission_id`` defaults to ``submission_id_for_sweep``; an id the cluster already
    knows is not an error: the answer is "already submitted" with that job's status.
    Everything is checked before anything is sent.
    """
    store_text = canonical_store(store)
    root = check_working_dir(sweep, working_dir or default_working_dir(sweep))
    submission_id = submission_id or submission_id_for_sweep(sweep, store_text)
    entrypoint = sweep_entrypoint(sweep, store_text, root)
    meta = {
        "arrakis_sweep": sweep.name,
        "arrakis_sweep_id": sweep.sweep_id,
        "arrakis_store": store_text,
        **(metadata or {}),
    }
    client = _client(address)
    try:
        client.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env=runtime_env(store_text, root),
            metadata=meta,
        )
    except Exception as exc:
        if "already exists" not in str(exc):
            raise _cluster_error(exc, address, f"submitting {submission_id}") from None
        state = job_state(submission_id, address, client=client)
        log.info("%s: already submitted (%s)", submission_id, state.status)
        return Submission(
            submission_id, "already submitted", state.status, entrypoint, str(root)
        )  # fmt: skip
    log.info("%s: submitted to %s: %s", submission_id, address, entrypoint)
    return Submission(submission_id, "submitted", "PENDING", entrypoint, str(root))


def resubmission_id(submission_id: str, address: str) -> str:
    """The next free id of a sweep's attempts (``ID``, ``ID-2``, ``ID-3``...), after
    checking that none of its jobs is still running (ClusterError if one is)."""
    pattern = re.compile(re.escape(submission_id) + r"(?:-(\d+))?$")
    attempts = {}
    for job in list_jobs(address, prefix=submission_id):
        match = pattern.match(job.submission_id)
        if match:
            attempts[int(match.group(1) or 1)] = job
    for job in attempts.values():
        if not job.terminal:
            raise ClusterError(
                f"job {job.submission_id} of this sweep is still {job.status}: wait for it, "
                f"or stop it (arrakis-ray jobs stop {job.submission_id} --address {address})"
            )
    n = max(attempts, default=0) + 1
    return submission_id if n == 1 else f"{submission_id}-{n}"


def job_state(submission_id: str, address: str, client=None) -> JobState:
    """The job's status; ClusterError for an unknown id or an unreachable cluster."""
    client = client or _client(address)
    try:
        info = client.get_job_info(submission_id)
    except Exception as exc:
        raise _cluster_error(exc, address, submission_id) from None
    return _state(info)


def job_logs(submission_id: str, address: str) -> str:
    """Everything the job has printed so far."""
    client = _client(address)
    try:
        return client.get_job_logs(submission_id)
    except Exception as exc:
        raise _cluster_error(exc, address, submission_id) from None


def follow_logs(submission_id: str, address: str, echo) -> None:
    """Pass the job's output to ``echo`` as it comes, until the job ends."""
    import asyncio

    client = _client(address)
    job_state(submission_id, address, client=client)  # an unknown id: one line, not a trace

    async def tail() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            echo(chunk)

    try:
        with warnings.catch_warnings():  # Ray's own websocket call, deprecated by aiohttp
            warnings.simplefilter("ignore", DeprecationWarning)
            asyncio.run(tail())
    except Exception as exc:
        raise _cluster_error(exc, address, submission_id) from None


def stop_job(submission_id: str, address: str) -> bool:
    """Ask the cluster to stop the job; False if it was not running."""
    client = _client(address)
    try:
        return bool(client.stop_job(submission_id))
    except Exception as exc:
        raise _cluster_error(exc, address, submission_id) from None


def list_jobs(address: str, prefix: str = ID_PREFIX) -> list[JobState]:
    """The cluster's jobs whose submission id starts with ``prefix``, oldest first."""
    client = _client(address)
    try:
        jobs = client.list_jobs()
    except Exception as exc:
        raise _cluster_error(exc, address, "listing jobs") from None
    found = [_state(j) for j in jobs if (j.submission_id or "").startswith(prefix)]
    return sorted(found, key=lambda j: (j.start_time or 0, j.submission_id))


def _state(info) -> JobState:
    return JobState(
        submission_id=info.submission_id or "",
        status=str(getattr(info.status, "value", info.status)),
        message=info.message or "",
        entrypoint=info.entrypoint or "",
        start_time=info.start_time,
        end_time=info.end_time,
        metadata=dict(info.metadata or {}),
    )


def _client(address: str):
    """A Jobs API client for ``address``; ClusterError (one line) if it cannot be had."""
    if not address:
        raise ClusterError("no Ray Jobs address: give --address http://HEAD:8265")
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:
        raise ClusterError(
            f"the Ray Jobs client is not installed ({exc}): pip install 'ray[default]'"
        ) from None
    try:
        return JobSubmissionClient(address)
    except Exception as exc:
        raise _cluster_error(exc, address, "connecting") from None


def _cluster_error(exc: Exception, address: str, what: str) -> ClusterError:
    """One line for a failed Jobs API call."""
    text = str(exc)
    if type(exc).__name__ == "AuthenticationError" or "status code 401" in text:
        return ClusterError(
            f"the Ray cluster at {address} wants an authentication token: set "
            "RAY_AUTH_MODE=token, with the cluster's token in RAY_AUTH_TOKEN or "
            "~/.ray/auth_token"
        )
    if "status code 404" in text and "does not exist" in text:
        return ClusterError(
            f"no job {what} on the Ray cluster at {address} "
            f"(arrakis-ray jobs list --address {address} shows its jobs)"
        )
    if isinstance(exc, ConnectionError) or type(exc).__name__.endswith("ConnectionError"):
        return ClusterError(
            f"cannot reach the Ray Jobs API at {address}: is the head node's dashboard "
            "running (ray start --head --include-dashboard true) and its port reachable?"
        )
    first = _last_error_line(text)
    return ClusterError(f"Ray cluster at {address}: {what}: {type(exc).__name__}: {first}")


def _last_error_line(text: str) -> str:
    """The line that says what went wrong: the server sends whole tracebacks, whose
    last ``Name: message`` line is the cause."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    causes = [line for line in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception): ", line)]
    return (causes[-1] if causes else lines[0] if lines else "").rstrip(".")
