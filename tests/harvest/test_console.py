"""The console of ``arrakis-ray harvest`` shows our progress lines and nothing of Ray's.

Ray's own messages (token authentication, the local instance, Ray Data's execution plan,
the C++ core worker's warnings) go to the log file the command names on its first line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml
from support import pipeline_dict

RAY_NOISE = ("Token authentication", "core_worker", "streaming_executor", "Started a local Ray")


def test_harvest_prints_only_our_lines(tmp_path):
    pipeline = tmp_path / "small.yaml"
    raw = pipeline_dict(hooks=["blocks.*.hook_resid_post"])
    raw["data"]["max_documents"] = 8
    pipeline.write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [str(Path(sys.executable).with_name("arrakis-ray")), "harvest", str(pipeline),
         "--store", str(tmp_path / "store")],
        cwd=tmp_path,
        env={**env, "ARRAKIS_RAY_LOG_DIR": str(tmp_path / "logs")},
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    for line in done.stderr.splitlines():  # our logging format: "HH:MM:SS arrakis_ray.x: ..."
        assert " arrakis_ray." in line and not any(n in line for n in RAY_NOISE), line
    assert "shard 0 done" in done.stderr
    first = done.stdout.splitlines()[0]
    assert first.startswith("log:"), done.stdout
    log = Path(first.split()[1])
    assert log.parent == tmp_path / "logs"
    assert any(n in log.read_text() for n in RAY_NOISE)  # Ray's lines went there instead
