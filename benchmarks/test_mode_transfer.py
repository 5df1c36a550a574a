"""receive_weights of a 256 MiB pytree in each process-to-process mode vs what a user would write
without weightwire, between the same two processes (Ray actors), in the same run. Each round is
checked exact. Publishing and offering happen in each round's untimed setup; the timed part is one
Ray call into the rollout actor, whose overhead both paths share.

- jax: vs a raw `connect().pull()` of the same arrays through transfer servers with the same config
- ray: vs a raw `ray.get` of the same arrays followed by `jax.device_put` onto the same shardings

    pytest benchmarks/test_mode_transfer.py --benchmark-enable
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
ROUNDS = {"jax": 9, "ray": 15}


@pytest.fixture(scope="module", params=["jax", "ray"])
def pair(request: pytest.FixtureRequest, ray_cluster: Any) -> Any:
    mode = request.param
    config = ww.TransferConfig(mode=mode, coordinator_name=f"bench-{uuid.uuid4().hex[:8]}", host="127.0.0.1",
                               timeout_s=120.0)
    trainer = BenchTrainer.remote(config, TOTAL_BYTES, LEAVES)
    rollout = BenchRollout.remote(config, TOTAL_BYTES, LEAVES)
    yield mode, ray_cluster, trainer, rollout
    for actor in (trainer, rollout):
        ray_cluster.kill(actor)


def _expected(weight_id: int) -> list[float]:
    return digest(make_params(weight_id, 1 << 12, LEAVES))  # per-leaf values do not depend on size


def test_raw_reference(benchmark: Any, pair: Any) -> None:
    mode, ray, trainer, rollout = pair
    benchmark.group = f"{mode}-transfer-256MiB"

    if mode == "jax":
        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            return ray.get(trainer.offer_raw.remote(), timeout=120), {}

        def raw(*offer: Any) -> None:
            assert ray.get(rollout.raw_pull.remote(*offer), timeout=300) == _expected(0)
    else:
        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            return (ray.get(trainer.put_raw.remote(), timeout=120),), {}

        def raw(*wrapped: Any) -> None:
            assert ray.get(rollout.raw_get.remote(*wrapped), timeout=300) == _expected(0)

    benchmark.pedantic(raw, setup=setup, rounds=ROUNDS[mode], warmup_rounds=1)


def test_receive_weights(benchmark: Any, pair: Any) -> None:
    mode, ray, trainer, rollout = pair
    benchmark.group = f"{mode}-transfer-256MiB"
    versions = itertools.count(1)

    def publish() -> tuple[tuple[int], dict[str, Any]]:
        weight_id = next(versions)
        ray.get(trainer.publish.remote(weight_id), timeout=120)
        return (weight_id,), {}

    def receive(weight_id: int) -> None:
        got_id, got = ray.get(rollout.receive.remote(), timeout=300)
        assert got_id == weight_id and got == _expected(weight_id)

    benchmark.pedantic(receive, setup=publish, rounds=ROUNDS[mode], warmup_rounds=1)
