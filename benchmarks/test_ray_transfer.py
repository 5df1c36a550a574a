"""ray mode: receive_weights of a 256 MiB pytree vs a raw `ray.get` of the same arrays followed by
`jax.device_put` onto the same shardings (what a user would write without weightwire), between
the same two processes, in the same run. Each round is checked exact.

    pytest benchmarks/test_ray_transfer.py --benchmark-enable
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
GROUP = "ray-transfer-256MiB"
ROUNDS = 15


@pytest.fixture(scope="module")
def pair(ray_cluster: Any) -> Any:
    config = ww.TransferConfig(mode="ray", coordinator_name=f"bench-{uuid.uuid4().hex[:8]}", timeout_s=120.0)
    trainer = BenchTrainer.remote(config, TOTAL_BYTES, LEAVES)
    rollout = BenchRollout.remote(config, TOTAL_BYTES, LEAVES)
    yield ray_cluster, trainer, rollout
    for actor in (trainer, rollout):
        ray_cluster.kill(actor)


def _expected(weight_id: int) -> list[float]:
    return digest(make_params(weight_id, 1 << 12, LEAVES))


def test_raw_ray_get_reference(benchmark: Any, pair: Any) -> None:
    ray, trainer, rollout = pair
    benchmark.group = GROUP

    def put() -> tuple[tuple[list[Any]], dict[str, Any]]:
        return (ray.get(trainer.put_raw.remote(), timeout=120),), {}

    def get(wrapped: list[Any]) -> None:
        assert ray.get(rollout.raw_get.remote(wrapped), timeout=300) == _expected(0)

    benchmark.pedantic(get, setup=put, rounds=ROUNDS, warmup_rounds=1)


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
