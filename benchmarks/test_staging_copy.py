"""Staging copy throughput: weightwire.staging.copy_into vs numpy.copyto into an already-faulted
buffer of the same size, 256 MiB, in the same run. Each run also checks the bytes are exact.

    pytest benchmarks/test_staging_copy.py --benchmark-enable
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from weightwire import staging

NBYTES = 256 << 20
GROUP = "staging-copy-256MiB"


@pytest.fixture(scope="module")
def source() -> np.ndarray:
    return np.random.default_rng(0).standard_normal(NBYTES // 4).astype(np.float32)


def test_numpy_copyto_reference(benchmark: Any, source: np.ndarray) -> None:
    benchmark.group = GROUP
    target = np.empty_like(source)
    target.fill(0)  # fault every page in first, as HostBuffer does
    benchmark.pedantic(np.copyto, args=(target, source), rounds=15, warmup_rounds=2)
    assert np.array_equal(target, source)


def test_staging_copy_into(benchmark: Any, source: np.ndarray) -> None:
    benchmark.group = GROUP
    with staging.HostBuffer(NBYTES) as buf:
        benchmark.pedantic(staging.copy_into, args=(buf, source), rounds=15, warmup_rounds=2)
        got = np.frombuffer(buf, dtype=np.float32)
        assert np.array_equal(got, source)
        del got
