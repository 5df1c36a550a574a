"""mode="jax" across processes: a trainer and rollout workers as separate Ray actors, and what
happens when one of them dies. Every test bounds its own runtime."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from _actors import Rollout, Trainer

import weightwire as ww

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(240)]

SMALL = 1 << 16
BIG = 96 << 20  # float32 elements: 384 MiB, a pull long enough to be killed in the middle


@pytest.fixture
def config() -> ww.TransferConfig:
    return ww.TransferConfig(mode="jax", coordinator_name=f"mp-{uuid.uuid4().hex[:8]}", host="127.0.0.1",
                             timeout_s=30.0)


def _coordinator(ray: Any, config: ww.TransferConfig) -> Any:
    return ray.get_actor(config.coordinator_name, namespace=config.ray_namespace)


def _wait_for_offer(ray: Any, config: ww.TransferConfig, client_id: str, timeout_s: float = 60.0) -> None:
    """Returns once `client_id` holds an offered ticket: its pull is starting or under way."""
    coordinator = _coordinator(ray, config)
    deadline = time.monotonic() + timeout_s
    while True:
        tickets = ray.get(coordinator.call.remote("tickets"), timeout=10)
        if any(t.client_id == client_id and t.status == "offered" for t in tickets):
            return
        assert time.monotonic() < deadline, f"{client_id} never got an offer"


def _kill(ray: Any, *actors: Any) -> None:
    for actor in actors:
        ray.kill(actor, no_restart=True)


def test_server_and_two_clients_as_separate_processes_over_ten_versions(ray_cluster: Any,
                                                                         config: ww.TransferConfig) -> None:
    ray = ray_cluster
    trainer = Trainer.remote(config)
    rollouts = [Rollout.remote(config) for _ in range(2)]
    try:
        received: list[list[int]] = [[], []]
        for weight_id in range(1, 11):
            assert ray.get(trainer.serve.remote(weight_id, SMALL), timeout=60)
            # Clients poll as they would between rollouts; every other version they skip.
            if weight_id % 2 == 0 or weight_id == 1:
                results = ray.get([r.receive.remote(SMALL, wait=True, timeout_s=30) for r in rollouts], timeout=90)
                for mine, (got_id, exact) in zip(received, results, strict=True):
                    assert exact, f"weight_id {got_id} arrived with wrong bytes"
                    mine.append(got_id)
        for mine in received:
            assert mine == [1, 2, 4, 6, 8, 10]
    finally:
        ray.get([r.close.remote() for r in rollouts] + [trainer.close.remote()], timeout=60)
        _kill(ray, trainer, *rollouts)


def test_a_client_killed_mid_transfer_does_not_wedge_the_server(ray_cluster: Any,
                                                                 config: ww.TransferConfig) -> None:
    ray = ray_cluster
    trainer = Trainer.remote(config)
    doomed, survivor = Rollout.remote(config), Rollout.remote(config)
    try:
        doomed_id = ray.get(doomed.client_id.remote(), timeout=60)
        ray.get(survivor.client_id.remote(), timeout=60)
        assert ray.get(trainer.serve.remote(1, BIG), timeout=60)
        pending = doomed.receive.remote(BIG, wait=True, timeout_s=30)
        _wait_for_offer(ray, config, doomed_id)
        _kill(ray, doomed)
        try:  # the kill usually lands mid-pull; if the pull won the race, it must have been exact
            assert ray.get(pending, timeout=60) == (1, True)
        except ray.exceptions.RayActorError:
            pass
        assert ray.get(survivor.receive.remote(BIG, wait=True, timeout_s=30), timeout=60) == (1, True)
        assert ray.get(trainer.serve.remote(2, SMALL), timeout=60)
        assert ray.get(survivor.receive.remote(SMALL, wait=True, timeout_s=30), timeout=60) == (2, True)
    finally:
        _kill(ray, trainer, doomed, survivor)


def test_a_dead_server_makes_waiting_clients_fail_by_their_deadline(ray_cluster: Any,
                                                                     config: ww.TransferConfig) -> None:
    ray = ray_cluster
    trainer = Trainer.remote(config)
    waiting, pulling = Rollout.remote(config), Rollout.remote(config)
    try:
        pulling_id = ray.get(pulling.client_id.remote(), timeout=60)
        ray.get(waiting.client_id.remote(), timeout=60)
        assert ray.get(trainer.serve.remote(1, BIG), timeout=60)
        timeout_s = 8.0
        mid_pull = pulling.receive_or_error.remote(BIG, timeout_s)
        _wait_for_offer(ray, config, pulling_id)
        _kill(ray, trainer)
        # One client was mid-pull, the other waits for a version that will never come.
        kind, message, seconds, result = ray.get(mid_pull, timeout=60)
        if kind:  # the usual case: the trainer died mid-pull
            assert "WeightTransferError" in ray.get(pulling.error_classes.remote(kind), timeout=30)
        else:  # the pull finished before the kill landed: then it must be exact
            assert result == (1, True)
        assert seconds < timeout_s + 2.0, message
        kind, message, seconds, _ = ray.get(waiting.receive_or_error.remote(BIG, timeout_s), timeout=60)
        assert kind and "WeightTransferError" in ray.get(waiting.error_classes.remote(kind), timeout=30)
        assert seconds < timeout_s + 2.0, message
    finally:
        _kill(ray, trainer, waiting, pulling)


def test_a_killed_and_restarted_trainer_finds_the_same_coordinator(ray_cluster: Any,
                                                                    config: ww.TransferConfig) -> None:
    ray = ray_cluster
    first = Trainer.remote(config)  # the first user: it creates the coordinator
    rollout = Rollout.remote(config)
    second = None
    try:
        assert ray.get(first.serve.remote(100, SMALL), timeout=60)
        assert ray.get(rollout.receive.remote(SMALL, wait=True, timeout_s=30), timeout=60) == (100, True)
        _kill(ray, first)
        coordinator = _coordinator(ray, config)  # outlived its creator
        second = Trainer.remote(config)
        assert ray.get(second.serve.remote(1, SMALL), timeout=60)  # a new epoch may restart its ids
        assert ray.get(rollout.receive.remote(SMALL, wait=True, timeout_s=30), timeout=60) == (1, True)
        assert _coordinator(ray, config)._actor_id == coordinator._actor_id
    finally:
        _kill(ray, first, rollout, *([second] if second is not None else []))
