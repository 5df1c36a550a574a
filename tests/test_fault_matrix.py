"""The fault matrix: each fault, in every mode where it applies, asserting that nothing waits past
its deadline + 2 s, that no wrong weights are ever returned, and that the server keeps serving.
Processes that die are Ray actors; every test bounds its runtime.

| fault | jax | native | ray | checkpoint | where |
|---|---|---|---|---|---|
| client killed mid-transfer | ✓ | ✓ | ✓ | ✓ | here (native: also test_native_mode, mid-stream for sure) |
| server killed mid-transfer | ✓ | ✓ | ✓ | ✓ | here (native: also test_native_mode) |
| coordinator actor killed | ✓ | ✓ | ✓ | ✓ | here |
| trainer restarted with lower ids | ✓ | ✓ | ✓ | ✓ | test_modes (restarted trainer), test_jax_multiprocess |
| slow client (stalled reads) | – | ✓ | – | – | here; only native sends per client in weightwire code |
| connection cut mid-transfer | – | ✓ | – | – | test_native_mode, test_wire (jax/ray own their connections) |
| corrupted byte | – | ✓ | – | ✓ | test_native_mode, test_wire, test_checkpoint_mode (jax, ray: no checksum) |
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from _actors import Rollout, Trainer

import weightwire as ww
from weightwire import handshake, net
from weightwire.handshake import Kind, Request, Status

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(180)]

MODES = ["jax", "native", "ray", "checkpoint"]
BIG = 16 << 20  # float32 elements: 64 MiB, a transfer long enough for a kill to land inside it
SMALL = 1 << 10
SLACK_S = 2.0


@pytest.fixture(params=MODES)
def config(request: pytest.FixtureRequest, tmp_path: Path) -> ww.TransferConfig:
    return ww.TransferConfig(mode=request.param, coordinator_name=f"faults-{uuid.uuid4().hex[:8]}",
                             host="127.0.0.1", timeout_s=30.0,
                             checkpoint_dir=str(tmp_path) if request.param == "checkpoint" else None)


def kill(ray: Any, *actors: Any) -> None:
    for actor in actors:
        ray.kill(actor, no_restart=True)


def is_weight_transfer_error(ray: Any, rollout: Any, kind: str) -> bool:
    return "WeightTransferError" in ray.get(rollout.error_classes.remote(kind), timeout=30)


def test_a_client_killed_mid_transfer_leaves_the_server_serving(ray_cluster: Any, config: ww.TransferConfig) -> None:
    ray = ray_cluster
    trainer, victim, survivor = Trainer.remote(config), Rollout.remote(config), Rollout.remote(config)
    try:
        ray.get([victim.client_id.remote(), survivor.client_id.remote()], timeout=60)
        assert ray.get(trainer.serve.remote(1, BIG), timeout=60)
        pending = victim.receive.remote(BIG, wait=True, timeout_s=30)
        kill(ray, victim)
        try:  # the kill usually lands mid-transfer; if the transfer won the race, it was exact
            assert ray.get(pending, timeout=60) == (1, True)
        except ray.exceptions.RayActorError:
            pass
        start = time.monotonic()
        assert ray.get(survivor.receive.remote(BIG, wait=True, timeout_s=30), timeout=60) == (1, True)
        assert ray.get(trainer.serve.remote(2, SMALL), timeout=60)
        assert ray.get(survivor.receive.remote(SMALL, wait=True, timeout_s=30), timeout=60) == (2, True)
        assert time.monotonic() - start < config.timeout_s
    finally:
        kill(ray, trainer, victim, survivor)


def test_a_server_killed_mid_transfer_fails_clients_by_their_deadline(ray_cluster: Any,
                                                                     config: ww.TransferConfig) -> None:
    ray = ray_cluster
    trainer, pulling, waiting = Trainer.remote(config), Rollout.remote(config), Rollout.remote(config)
    timeout_s = 5.0
    try:
        ray.get([pulling.client_id.remote(), waiting.client_id.remote()], timeout=60)
        assert ray.get(trainer.serve.remote(1, BIG), timeout=60)
        ray.get(trainer.flush.remote(), timeout=60)
        mid_transfer = pulling.receive_or_error.remote(BIG, timeout_s)
        kill(ray, trainer)
        kind, message, seconds, result = ray.get(mid_transfer, timeout=60)
        if kind:
            assert is_weight_transfer_error(ray, pulling, kind), f"{kind}: {message}"
        else:  # the transfer finished before the kill, or the bytes outlive the trainer (ray, checkpoint)
            assert result == (1, True)
        assert seconds < timeout_s + SLACK_S, message
        # A client that holds nothing gets either the last version, exact, or a typed error; one
        # that already holds it waits in vain and times out: nothing newer will ever come.
        kind, message, seconds, result = ray.get(waiting.receive_or_error.remote(BIG, timeout_s), timeout=60)
        assert (kind and is_weight_transfer_error(ray, waiting, kind)) or result == (1, True), message
        assert seconds < timeout_s + SLACK_S, message
        if not kind:
            kind, message, seconds, _ = ray.get(waiting.receive_or_error.remote(BIG, timeout_s), timeout=60)
            assert kind and is_weight_transfer_error(ray, waiting, kind)
            assert seconds < timeout_s + SLACK_S, message
    finally:
        kill(ray, trainer, pulling, waiting)


def _coordinator(ray: Any, config: ww.TransferConfig) -> Any:
    return ray.get_actor(config.coordinator_name, namespace=config.ray_namespace)


def _wait_until_gone(ray: Any, config: ww.TransferConfig) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            ray.get(_coordinator(ray, config).call.remote("latest"), timeout=10)
        except (ValueError, ray.exceptions.RayActorError):
            return
        assert time.monotonic() < deadline, "the killed coordinator still answers"


def test_a_killed_coordinator_fails_calls_with_coordinator_error_by_the_deadline(
        ray_cluster: Any, config: ww.TransferConfig) -> None:
    from _actors import make_params, matches

    server, client = ww.create_server(config), ww.create_client(config)
    try:
        assert server.serve_weights(1, make_params(1, SMALL))
        server.flush(30.0)
        assert client.receive_weights(None, wait=True, timeout_s=30).weight_id == 1
        ray_cluster.kill(_coordinator(ray_cluster, config))
        _wait_until_gone(ray_cluster, config)
        for call in (lambda: client.receive_weights(None, timeout_s=3.0),
                     lambda: client.receive_weights(None, wait=True, timeout_s=3.0),
                     lambda: (server.serve_weights(2, make_params(2, SMALL)), server.flush(3.0))):
            start = time.monotonic()
            with pytest.raises(ww.CoordinatorError):
                call()
            assert time.monotonic() - start < 3.0 + SLACK_S
    finally:
        start = time.monotonic()
        client.close()
        server.close()
        assert time.monotonic() - start < 2 * SLACK_S + 10  # close never hangs on a dead coordinator
    # Recovery: the next trainer and client of the job get a fresh coordinator under the same name.
    with ww.create_server(config) as server, ww.create_client(config) as client:
        assert server.serve_weights(1, make_params(1, SMALL))
        server.flush(30.0)
        update = client.receive_weights(None, wait=True, timeout_s=30)
        assert update.weight_id == 1 and matches(update.params, 1, SMALL)


def test_a_stalled_client_does_not_hold_back_the_others(ray_cluster: Any) -> None:
    """native: each connection has its own sender, so a reader that stops reading only stalls its
    own stream (here for the whole test) while other clients get the version at full speed."""
    from _actors import make_params

    config = ww.TransferConfig(mode="native", coordinator_name=f"faults-{uuid.uuid4().hex[:8]}", host="127.0.0.1",
                               timeout_s=30.0, native_shared_memory=False)
    with ww.create_server(config) as server:
        assert server.serve_weights(1, make_params(1, BIG))
        with net.connect(server.address, 10.0) as stalled:
            stalled.settimeout(10.0)
            req = Request(server.epoch, 1, 0, 1, Kind.TCP)
            assert handshake.client_side(stalled, server._secret, req)[0] is Status.OK
            # Never read: the server's sender for this connection blocks once the socket buffers fill.
            others = [Rollout.remote(config) for _ in range(2)]
            try:
                start = time.monotonic()
                got = ray_cluster.get([r.receive.remote(BIG, wait=True, timeout_s=30) for r in others], timeout=60)
                assert got == [(1, True), (1, True)]
                assert time.monotonic() - start < 15
                assert server.wait_sending(lambda n: n >= 1, 0)  # the stalled stream is still being sent, not dropped
            finally:
                kill(ray_cluster, *others)
