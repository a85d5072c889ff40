"""A failure inside a Ray task reaches the user as one line, without ANSI codes.

The unit tests raise in real remote tasks (plain tasks and a Ray Data actor pool, as the
harvest and the tool runner use them); the end-to-end tests run ``arrakis-ray analyze``
with a tool that raises and read its stderr.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from arrakis_ray.errors import HarvestError, RemoteTaskError, ToolError
from arrakis_ray.ray_session import one_line_error, ray_errors, user_error

ANSI = "\x1b["


def _raised(call) -> BaseException:
    try:
        call()
    except Exception as exc:
        return exc
    raise AssertionError("expected the Ray call to fail")


def _tool_error():
    raise ToolError("tool boom: shard 3 has no layer 9")


def _value_error():
    raise ValueError("bad value\nsecond line of the message")


def _nested():
    import ray

    return ray.get(ray.remote(_tool_error).remote())


class _FailingStep:
    """A Ray Data step that raises what it was built with (like the harvest's actor)."""

    def __init__(self, exc: Exception):
        self.exc = exc

    def __call__(self, batch):
        try:
            raise HarvestError("inner cause")
        except HarvestError as inner:
            raise self.exc from inner


def _ray_data(exc: Exception):
    import ray.data

    ds = ray.data.from_items([{"x": 1}]).map_batches(
        _FailingStep,
        fn_constructor_kwargs={"exc": exc},
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.25,
    )
    return list(ds.iter_rows())


def test_a_plain_tasks_arrakis_error_is_itself(ray_session):
    import ray

    exc = _raised(lambda: ray.get(ray.remote(_tool_error).remote()))
    assert ANSI in str(exc)  # what Ray raises: the coloured remote traceback as message
    cause = user_error(exc)
    assert type(cause) is ToolError
    assert str(cause) == "tool boom: shard 3 has no layer 9"
    nested = user_error(_raised(lambda: ray.get(ray.remote(_nested).remote())))
    assert type(nested) is ToolError and str(nested) == str(cause)


def test_a_ray_data_steps_arrakis_error_is_read_from_the_traceback(ray_session):
    exc = _raised(lambda: _ray_data(HarvestError("shard 2: tokenizer failed")))
    cause = user_error(exc)
    assert type(cause) is HarvestError
    assert str(cause) == "shard 2: tokenizer failed"  # the outermost, not "inner cause"


def test_other_exceptions_become_one_line_naming_task_and_type(ray_session):
    import ray

    from arrakis_ray.ray_session import log_file

    exc = _raised(lambda: ray.get(ray.remote(_value_error).remote()))
    assert user_error(exc) is None
    error = one_line_error(exc, "tool boom")
    assert isinstance(error, RemoteTaskError)
    text = str(error)
    assert "\n" not in text and ANSI not in text
    assert text.startswith("tool boom failed in task _value_error(): ValueError: bad value")
    assert str(log_file()) in text
    assert "second line of the message" in log_file().read_text()  # the whole traceback

    data = one_line_error(_raised(lambda: _ray_data(KeyError("k"))), "harvest of run x")
    assert "\n" not in str(data) and "KeyError: 'k'" in str(data)
    assert "MapBatches(_FailingStep)" in str(data)


def test_ray_errors_reraises_one_line_and_leaves_other_errors_alone(ray_session):
    import ray

    with pytest.raises(ToolError) as caught:
        with ray_errors("tool boom"):
            ray.get(ray.remote(_tool_error).remote())
    assert str(caught.value) == "tool boom failed: tool boom: shard 3 has no layer 9"
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    with pytest.raises(ZeroDivisionError):  # raised on the driver: not Ray's, unchanged
        with ray_errors("tool boom"):
            _ = 1 / 0
    with pytest.raises(ToolError, match="^driver side$"):
        with ray_errors("tool boom"):
            raise ToolError("driver side")
    assert one_line_error(ToolError("x"), "y") is None


# --- end to end: `arrakis-ray analyze` with a tool that raises ----------------------------

TOOL_MODULE = '''
from dataclasses import dataclass

import pyarrow as pa

from arrakis_ray.errors import ToolError
from arrakis_ray.tools import Tool


@dataclass(frozen=True)
class Params:
    """Parameters of the failing tools."""


class Refuses(Tool):
    """A tool whose shard computation raises the project's own error."""

    name = "refuses"
    summary = "raises ToolError"
    Params = Params

    def required_hooks(self, manifest):
        return []

    def result_schema(self, output=None):
        return pa.schema([("run_id", pa.string())])

    def compute_shard(self, inputs, model):
        raise ToolError(f"tool refuses: shard {inputs.shard} is not to its taste")


class Crashes(Refuses):
    """A tool with a bug: its shard computation raises ValueError."""

    name = "crashes"

    def compute_shard(self, inputs, model):
        raise ValueError(f"bug on shard {inputs.shard}")
'''


@pytest.mark.parametrize(
    ("tool", "expected"),
    [
        ("Refuses", "tool refuses: shard"),
        ("Crashes", "ValueError: bug on shard"),
    ],
)
def test_analyze_prints_one_error_line(harvested, tmp_path, tool, expected):
    _, _, result = harvested
    (tmp_path / "failing_tools.py").write_text(textwrap.dedent(TOOL_MODULE))
    script = Path(sys.executable).with_name("arrakis-ray")
    done = subprocess.run(
        [str(script), "analyze", str(result.run_dir), "--tool", f"failing_tools:{tool}"],
        cwd=tmp_path,
        env={**_env(), "PYTHONPATH": str(tmp_path), "ARRAKIS_RAY_LOG_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode != 0
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("arrakis-ray: error: ") and expected in lines[0], lines[0]
    assert ANSI not in done.stderr


def _env() -> dict:
    import os

    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)  # its own local cluster, like a user's first call
    return env
