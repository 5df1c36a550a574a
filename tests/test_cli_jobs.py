"""`python -m weightwire demo` and `bench`, end to end, small: each starts and stops its own
local Ray cluster in a subprocess, and must leave nothing running behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)


def _raylets() -> int:
    out = subprocess.run(["pgrep", "-c", "-f", "raylet"], capture_output=True, text=True)
    return int(out.stdout.strip() or 0)


def _shm() -> set[str]:
    return {p.name for p in Path("/dev/shm").iterdir()} if Path("/dev/shm").is_dir() else set()


def _has_descendant(root: int, title: str) -> bool:
    """Whether a process under `root` has `title` in its command line (Ray names actor processes
    "ray::<Class>..."). Only descendants count: processes of another cluster, or a previous run's
    still exiting, are not this job's."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    for pid in parents:
        ancestor = pid
        while ancestor in parents and ancestor not in (0, 1, root):
            ancestor = parents[ancestor]
        if ancestor == root:
            try:
                if title in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                    return True
            except OSError:
                continue
    return False


def _weightwire(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "weightwire", *args], capture_output=True, text=True, timeout=540)


def test_demo_runs_every_mode_verifies_every_version_and_cleans_up() -> None:
    raylets, shm = _raylets(), _shm()
    result = _weightwire("demo", "--mode", "all", "--size", "8", "--layers", "2", "--steps", "3",
                         "--step-seconds", "0")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "OK: every received version matched the trainer's digest (jax, ray, checkpoint, native)" in result.stdout
    for mode in ("jax", "ray", "checkp", "native"):
        assert f"│ {mode}" in result.stdout
    assert _raylets() == raylets, "the demo left Ray processes behind"
    assert _shm() <= shm, "the demo left shared memory behind"


def test_bench_measures_every_path_exactly_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = _weightwire("bench", "--sizes", "4", "--repeats", "1", "--json", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    paths = {r["path"] for r in json.loads(out.read_text())["results"]}
    assert {"raw TCP", "raw jax pull, 1 stream", "raw jax pull, 2 streams", "ray.put + ray.get",
            "numpy memcpy (1 process)", "weightwire mode=jax", "weightwire mode=ray",
            "weightwire mode=checkpoint"} <= paths
    assert "vs raw TCP" in result.stdout


def test_demo_rejects_an_unknown_mode() -> None:
    result = _weightwire("demo", "--mode", "pigeon")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_ctrl_c_stops_the_demo_and_leaves_nothing_behind() -> None:
    import os
    import signal
    import time

    raylets, shm = _raylets(), _shm()
    # A test run started in the background inherits SIGINT ignored, and so would the demo: give it
    # the default disposition a user's terminal gives it.
    demo = subprocess.Popen([sys.executable, "-m", "weightwire", "demo", "--size", "8", "--layers", "2",
                             "--steps", "1000", "--step-seconds", "0.05"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        # Interrupt once rollout actors exist, i.e. in the middle of the job.
        while not _has_descendant(demo.pid, "ray::Rollout"):
            assert time.monotonic() < deadline, "the demo's rollout actors never started"
            try:  # waiting on the demo itself paces the polling
                demo.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                continue
            pytest.fail(f"the demo exited early: {demo.communicate()[1][-2000:]}")
        os.kill(demo.pid, signal.SIGINT)
        _, err = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 130, err[-2000:]
    assert _raylets() == raylets, "Ray processes outlived the interrupted demo"
    assert _shm() <= shm
