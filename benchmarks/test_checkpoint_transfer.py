"""checkpoint mode: writing and reading back a 256 MiB pytree (serve_weights + flush, then
receive_weights) vs numpy.save + numpy.load of the same arrays to the same directory, in the same
run. Each round is checked exact.

    pytest benchmarks/test_checkpoint_transfer.py --benchmark-enable
"""

from __future__ import annotations

import itertools
import uuid
from pathlib import Path
from typing import Any

import jax
import numpy as np
import pytest
from _bench_actors import digest, make_params

import weightwire as ww

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(600)]

TOTAL_BYTES = 256 << 20
LEAVES = 8
GROUP = "checkpoint-write-read-256MiB"
ROUNDS = 7


def test_numpy_save_load_reference(benchmark: Any, tmp_path: Path) -> None:
    benchmark.group = GROUP
    leaves = [np.asarray(a) for a in jax.tree.leaves(make_params(0, TOTAL_BYTES, LEAVES))]
    rounds = itertools.count()

    def save_and_load() -> None:
        directory = tmp_path / f"r{next(rounds)}"
        directory.mkdir()
        for i, leaf in enumerate(leaves):
            np.save(directory / f"{i}.npy", leaf)
        loaded = [np.load(directory / f"{i}.npy") for i in range(len(leaves))]
        assert digest(loaded) == digest(leaves)

    benchmark.pedantic(save_and_load, rounds=ROUNDS, warmup_rounds=1)


def test_checkpoint_serve_and_receive(benchmark: Any, tmp_path: Path) -> None:
    benchmark.group = GROUP
    config = ww.TransferConfig(mode="checkpoint", checkpoint_dir=str(tmp_path), max_checkpoints=2,
                               coordinator_name=f"bench-{uuid.uuid4().hex[:8]}", timeout_s=120.0)
    versions = itertools.count(1)
    with ww.create_server(config) as server, ww.create_client(config) as client:

        def prepare() -> tuple[tuple[int, Any], dict[str, Any]]:
            weight_id = next(versions)
            return (weight_id, jax.block_until_ready(make_params(weight_id, TOTAL_BYTES, LEAVES))), {}

        def serve_and_receive(weight_id: int, params: Any) -> None:
            server.serve_weights(weight_id, params)
            server.flush()
            update = client.receive_weights(None)
            assert update.weight_id == weight_id and digest(update.params) == digest(params)

        benchmark.pedantic(serve_and_receive, setup=prepare, rounds=ROUNDS, warmup_rounds=1)
