"""What is particular to mode="ray": one object per version, and what happens to a version whose
trainer died: it is delivered exactly or the client is told it is lost, never hung or wrong, and
the restarted trainer's epoch is picked up."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jax.numpy as jnp
import pytest
from _actors import Rollout, Trainer

import weightwire as ww
from weightwire.coordinator import CoordinatorState
from weightwire.manifest import Manifest

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(240)]


@pytest.fixture
def config() -> ww.TransferConfig:
    return ww.TransferConfig(mode="ray", coordinator_name=f"ray-{uuid.uuid4().hex[:8]}", timeout_s=20.0)


def test_each_version_is_put_once_whatever_the_number_of_clients(config: ww.TransferConfig,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value, **kw: puts.append(1) or real_put(value, **kw))
    with ww.create_server(config) as server:
        clients = [ww.create_client(config) for _ in range(3)]
        try:
            for weight_id in (1, 2):
                server.serve_weights(weight_id, {"w": jnp.full((1 << 20,), weight_id, jnp.float32)})
                assert all(c.receive_weights(None).weight_id == weight_id for c in clients)
        finally:
            for c in clients:
                c.close()
    assert len(puts) == 2


def test_the_coordinator_keeps_only_the_latest_version() -> None:
    state = CoordinatorState()
    state.register_server("e", "ray")
    for weight_id in range(1, 6):
        state.publish("e", weight_id, Manifest("e", weight_id, None, (), location=f"ref-{weight_id}"))
    assert state.latest().location == "ref-5"  # type: ignore[union-attr]
    assert "ref-4" not in repr(vars(state))  # nothing else holds an older ref


def _wait_until_dead(ray: Any, actor: Any, timeout_s: float = 60.0) -> None:
    """ray.kill is asynchronous: calls made right after it may still be served."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.epoch.remote(), timeout=timeout_s)
        except ray.exceptions.RayActorError:
            return
        assert time.monotonic() < deadline, "the killed actor is still answering"


def test_a_dead_trainers_version_is_lost_and_its_successor_is_picked_up(ray_cluster: Any,
                                                                        config: ww.TransferConfig) -> None:
    ray = ray_cluster
    first, rollout = Trainer.remote(config), Rollout.remote(config)
    second = None
    try:
        assert ray.get(first.serve.remote(1, 1 << 20), timeout=60)
        assert ray.get(rollout.receive.remote(1 << 20, wait=True, timeout_s=20), timeout=60) == (1, True)
        assert ray.get(first.serve.remote(2, 1 << 20), timeout=60)
        ray.kill(first, no_restart=True)
        _wait_until_dead(ray, first)
        kind, message, seconds, result = ray.get(rollout.receive_or_error.remote(1 << 20, 10.0), timeout=60)
        # Ray decides whether an object outlives its owner; either way nothing wrong comes back.
        if kind:
            assert kind == "WeightTransferError" and "weight_id 2" in message and "died" in message
        else:
            assert result == (2, True)
        assert seconds < 10.0 + 2.0
        second = Trainer.remote(config)
        assert ray.get(second.serve.remote(1, 1 << 20), timeout=60)
        assert ray.get(rollout.receive.remote(1 << 20, wait=True, timeout_s=20), timeout=60) == (1, True)
    finally:
        for actor in (first, rollout, second):
            if actor is not None:
                ray.kill(actor, no_restart=True)
