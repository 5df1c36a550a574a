"""jax mode: receive_weights of a 256 MiB pytree vs a raw `connect().pull()` of the same arrays,
between the same two processes (Ray actors), in the same run. Each round is checked exact.

    pytest benchmarks/test_jax_transfer.py --benchmark-enable

Publishing (serve_weights) and offering (await_pull) happen in each round's untimed setup; the
timed part is one Ray call into the rollout actor, whose overhead both paths share.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import pytest
from _bench_actors import BenchRollout, BenchTrainer, digest, make_params

import weightwire as ww

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(600)]

TOTAL_BYTES = 256 << 20
LEAVES = 8
GROUP = "jax-transfer-256MiB"
ROUNDS = 9


@pytest.fixture(scope="module")
def pair(ray_cluster: Any) -> Any:
    config = ww.TransferConfig(mode="jax", coordinator_name=f"bench-{uuid.uuid4().hex[:8]}", host="127.0.0.1",
                               timeout_s=120.0)
    trainer = BenchTrainer.remote(config, TOTAL_BYTES, LEAVES)
    rollout = BenchRollout.remote(config, TOTAL_BYTES, LEAVES)
    yield ray_cluster, trainer, rollout
    for actor in (trainer, rollout):
        ray_cluster.kill(actor)


def _expected(weight_id: int) -> list[float]:
    return digest(make_params(weight_id, 1 << 12, LEAVES))  # per-leaf values do not depend on size


def test_raw_transfer_pull_reference(benchmark: Any, pair: Any) -> None:
    ray, trainer, rollout = pair
    benchmark.group = GROUP

    def offer() -> tuple[tuple[str, int], dict[str, Any]]:
        return ray.get(trainer.offer_raw.remote(), timeout=120), {}

    def pull(address: str, pull_id: int) -> None:
        got = ray.get(rollout.raw_pull.remote(address, pull_id), timeout=300)
        assert got == _expected(0)

    benchmark.pedantic(pull, setup=offer, rounds=ROUNDS, warmup_rounds=1)


def test_receive_weights(benchmark: Any, pair: Any) -> None:
    ray, trainer, rollout = pair
    benchmark.group = GROUP
    versions = itertools.count(1)

    def publish() -> tuple[tuple[int], dict[str, Any]]:
        weight_id = next(versions)
        ray.get(trainer.publish.remote(weight_id), timeout=120)
        return (weight_id,), {}

    def receive(weight_id: int) -> None:
        got_id, got = ray.get(rollout.receive.remote(), timeout=300)
        assert got_id == weight_id and got == _expected(weight_id)

    benchmark.pedantic(receive, setup=publish, rounds=ROUNDS, warmup_rounds=1)
