"""Session set-up for tests/ and benchmarks/: JAX on CPU with 4 virtual devices (set before
anything imports jax), a local Ray cluster for what needs one, and skipping `gpu` tests without a
GPU."""

from __future__ import annotations

import os
import pathlib
import shutil
from collections.abc import Iterator
from typing import Any

import pytest

# Inherited by Ray workers too, so actors see the same 4 CPU devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a throwaway loopback cluster, no token files

ROOT = pathlib.Path(__file__).resolve().parent
# Ray workers import the helper actors of tests/ and benchmarks/ from here.
ACTOR_PATH = os.pathsep.join(str(ROOT / d) for d in ("tests", "benchmarks"))


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Any]:
    """A local Ray cluster for the session; its workers can import the helper actor modules."""
    import ray

    def start() -> None:
        # _node_ip_address keeps the whole cluster on loopback, as every test here must be.
        ray.init(num_cpus=8, include_dashboard=False, configure_logging=False, namespace="weightwire-tests",
                 _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {"PYTHONPATH": ACTOR_PATH, "JAX_PLATFORMS": os.environ["JAX_PLATFORMS"],
                                           "XLA_FLAGS": os.environ["XLA_FLAGS"]}})

    try:
        start()
    except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception for this
        # Ray gives its raylet 30 s to register and, rarely on this 2-core machine, it does not
        # (seen once in the sanitizer run): one fresh start, then the error stands.
        if "timed out during startup" not in str(exc):
            raise
        ray.shutdown()
        start()
    yield ray
    ray.shutdown()


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def pytest_collection_modifyitems(config: Any, items: list[pytest.Item]) -> None:
    if _has_nvidia_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
