"""Pinned staging on an NVIDIA GPU: HostBuffers registered with the CUDA runtime, and a bit-exact
host -> device -> host round trip through them. Skipped on machines without a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from weightwire import staging

pytestmark = pytest.mark.gpu

MiB = 1 << 20


@pytest.fixture(scope="module")
def gpu():  # type: ignore[no-untyped-def]
    jax = pytest.importorskip("jax")
    try:
        devices = jax.devices("gpu")
    except RuntimeError:
        pytest.skip("jax sees no GPU (install jax[cuda12] on a GPU machine)")
    return devices[0]


def test_buffers_are_registered_with_the_cuda_runtime(gpu) -> None:  # type: ignore[no-untyped-def]
    assert staging.cuda_runtime_path() is not None
    with staging.HostBuffer(64 * MiB) as buf:
        assert buf.cuda_registered and buf.pinned


def test_round_trip_through_a_registered_buffer_is_bit_exact(gpu) -> None:  # type: ignore[no-untyped-def]
    import jax

    src = np.random.default_rng(1).standard_normal(64 * MiB // 4).astype(np.float32)
    with staging.StagingPool(256 * MiB) as pool, pool.lease(src.nbytes) as buf:
        staging.copy_into(buf, src)
        on_device = jax.device_put(np.frombuffer(buf, dtype=np.float32, count=src.size), gpu)
        on_device.block_until_ready()
        assert np.asarray(on_device).tobytes() == src.tobytes()
        del on_device
