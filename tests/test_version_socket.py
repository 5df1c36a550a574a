"""The coordinator's version socket: every receive_weights asks it which version is the newest,
so its answers must be as fresh as the actor's (never one older than a publish that returned),
and a client that cannot reach it must still get correct answers, by actor calls."""

from __future__ import annotations

import logging
import select
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
import pytest

import weightwire as ww
from weightwire import net
from weightwire._ray import CoordinatorClient

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(120)]


@pytest.fixture
def config() -> ww.TransferConfig:
    return ww.TransferConfig(mode="ray", coordinator_name=f"vs-{uuid.uuid4().hex[:8]}", timeout_s=20.0)


@pytest.fixture
def coordinator(config: ww.TransferConfig, server: Any) -> Iterator[CoordinatorClient]:
    c = CoordinatorClient(config, f"test-{uuid.uuid4().hex}")
    yield c
    c.detach()


def serve(server: Any, weight_id: int) -> None:
    assert server.serve_weights(weight_id, {"w": jnp.full((16,), weight_id, jnp.float32)})


def test_it_answers_what_was_published_from_a_routable_address(server: Any, coordinator: CoordinatorClient,
                                                                ray_cluster: Any) -> None:
    address = ray_cluster.get(coordinator.actor.version_address.remote(), timeout=20)
    host, port = net.parse_address(address)
    assert host == ray_cluster.util.get_node_ip_address() and port != 0  # port 0 bound; never a wildcard
    assert coordinator.ask_latest_version(10.0).answer(10.0) is None
    for weight_id in (1, 2, 3):
        serve(server, weight_id)  # returned: every later question must see it
        assert coordinator.ask_latest_version(10.0).answer(10.0) == (server.epoch, weight_id)


def test_questions_in_flight_together_get_their_own_answers(server: Any, coordinator: CoordinatorClient) -> None:
    serve(server, 1)
    first, second = coordinator.ask_latest_version(10.0), coordinator.ask_latest_version(10.0)
    serve(server, 2)
    third = coordinator.ask_latest_version(10.0)
    assert third.answer(10.0) == (server.epoch, 2)  # answered out of order, each on its own connection
    assert second.answer(10.0) == first.answer(10.0) == (server.epoch, 1)


def test_an_abandoned_question_never_answers_a_later_one(server: Any, coordinator: CoordinatorClient) -> None:
    serve(server, 1)
    abandoned = coordinator.ask_latest_version(10.0)
    conn = abandoned._conn
    assert conn is not None
    assert select.select([conn], [], [], 10.0)[0]  # its answer (version 1) is there, unread
    abandoned.abandon()
    serve(server, 2)
    assert coordinator.ask_latest_version(10.0).answer(10.0) == (server.epoch, 2)


def test_a_client_that_cannot_reach_it_asks_the_actor(server: Any, coordinator: CoordinatorClient,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as unreachable:
        unreachable.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        coordinator._version_address = net.format_address(*unreachable.getsockname())
        serve(server, 1)
        with caplog.at_level(logging.WARNING, logger="weightwire._ray"):
            asked = coordinator.ask_latest_version(10.0)
        assert "unreachable" in caplog.text and "actor calls" in caplog.text
        assert asked._ref is not None and asked.answer(10.0) == (server.epoch, 1)
        serve(server, 2)
        asked = coordinator.ask_latest_version(10.0)
        assert asked._ref is not None and asked.answer(10.0) == (server.epoch, 2)  # no second connect attempt


def test_a_made_up_epoch_length_is_never_read_and_the_actor_answers_instead(
        server: Any, coordinator: CoordinatorClient) -> None:
    import threading

    from weightwire.coordinator import VERSION_HEADER

    serve(server, 7)
    done = threading.Event()
    with net.bind("127.0.0.1") as impostor:
        def answer_garbage() -> None:
            with impostor.accept(10.0) as conn:
                conn.recv(1)
                conn.sendall(VERSION_HEADER.pack(7, 1 << 31))  # "a 2 GiB epoch follows", then nothing
                done.wait(20)  # the connection stays open: a reader that believed it would wait

        thread = threading.Thread(target=answer_garbage, daemon=True)
        thread.start()
        coordinator._version_address = impostor.address
        try:
            assert coordinator.ask_latest_version(10.0).answer(3.0) == (server.epoch, 7)
        finally:
            done.set()
            thread.join(10)
