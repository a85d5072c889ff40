"""Sweeps as Ray Jobs: submit a sweep file to a cluster's Jobs API, and follow it.

A submitted sweep is one Ray Job whose entrypoint is ``arrakis-ray sweep`` itself, run
on the cluster against the same store: the job plans the sweep there and runs only what
is missing. The job's submission id derives from the sweep's content, the store and
its planned runs (new data at the same path is a new run id, so a new job), so
submitting the same sweep twice is a no-op: an id the cluster knows is answered
"already submitted" with that job's status, and the Jobs API refuses a second job with
an id it knows (atomically, in the head's key-value store) when two submit at once.
Two schedulers firing the same schedule at once rely on the same refusal
(``schedules.py``).

The job's working directory is uploaded by Ray (``job_inputs.py`` says what it must
hold). The store is not uploaded: it must be a place every node can reach, an absolute
path on a shared file system or an object-store URI.

Only the HTTP client of Ray's Jobs API is used (``ray.job_submission``): no Ray session
is started here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shlex
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arrakis_ray.errors import ClusterError
from arrakis_ray.store.location import is_uri, store_path
from arrakis_ray.sweeps.job_inputs import (  # noqa: F401 - re-exported
    EXCLUDES,
    MAX_CHECKPOINT_BYTES,
    JobInput,
    check_working_dir,
    default_working_dir,
    job_files,
    job_inputs,
    tree_bytes,
)

log = logging.getLogger(__name__)

ID_PREFIX = "arrakis-"  # every job this package submits; `jobs list` shows these
SWEEP_PREFIX = ID_PREFIX + "sweep-"
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


def submission_id_for_sweep(sweep, store: str | os.PathLike, plan=None) -> str:
    """``arrakis-sweep-`` and 16 hex of (sweep id, canonical store, each planned point's
    run id and point key): the same sweep over the same inputs into the same store is the
    same job, and new data at the same path (a new run id) a new one. ``plan``: the
    sweep's ``SweepPlan`` (planned here, without Ray, if not given)."""
    from arrakis_ray.errors import DataError, ModelLoadError
    from arrakis_ray.sweeps.plan import plan_sweep

    store_text = canonical_store(store)
    try:
        plan = plan or plan_sweep(sweep, store_text)
    except (DataError, ModelLoadError, FileNotFoundError) as exc:
        # inputs only the cluster sees (a shared filesystem's absolute paths): the id
        # falls back to how they are written, with the stamps of those seen here
        log.info("submission id from the inputs as written (%s)", exc)
        lines = [sweep.sweep_id, store_text, *_inputs_as_written(sweep)]
    else:
        lines = [sweep.sweep_id, store_text, *(f"{p.run_id} {p.point_key}" for p in plan.points)]
    return SWEEP_PREFIX + hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _inputs_as_written(sweep) -> list[str]:
    """Each input file of the sweep's jobs as written, with its stamp where it exists."""

    lines = []
    for item in job_inputs(sweep):
        path = Path(item.path)
        stamp = f"{path.stat().st_size} {path.stat().st_mtime_ns}" if path.is_file() else "-"
        lines.append(f"{item.written or item.path} {stamp}")
    return sorted(lines)


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
    knows (asked first, ``get_job_info``) is not an error: the answer is "already
    submitted" with that job's status. Everything is checked before anything is sent.
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
    known = _known_job(client, submission_id, address)
    if known is not None:
        log.info("%s: already submitted (%s)", submission_id, known.status)
        return Submission(
            submission_id, "already submitted", known.status, entrypoint, str(root)
        )  # fmt: skip
    try:
        client.submit_job(
            entrypoint=entrypoint,
            submission_id=submission_id,
            runtime_env=runtime_env(store_text, root),
            metadata=meta,
        )
    except Exception as exc:
        # the race fallback: another submitter took the id between the check above and
        # this call; the head refuses the second job atomically, and Ray says so only in
        # its error text
        if "already exists" not in str(exc):
            raise _cluster_error(exc, address, f"submitting {submission_id}") from None
        state = job_state(submission_id, address, client=client)
        log.info("%s: already submitted (%s)", submission_id, state.status)
        return Submission(
            submission_id, "already submitted", state.status, entrypoint, str(root)
        )  # fmt: skip
    log.info("%s: submitted to %s: %s", submission_id, address, entrypoint)
    return Submission(submission_id, "submitted", "PENDING", entrypoint, str(root))


def _known_job(client, submission_id: str, address: str) -> JobState | None:
    """The cluster's job of that id, or None if it has none."""
    try:
        return _state(client.get_job_info(submission_id))
    except Exception as exc:
        error = _cluster_error(exc, address, submission_id)
        if str(error).startswith(f"no job {submission_id} "):
            return None
        raise error from None


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
