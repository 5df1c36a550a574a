"""CoordinatorState, the coordinator's logic, without Ray."""

from __future__ import annotations

import pytest

from weightwire.coordinator import SERVER_SILENCE_S, CoordinatorState
from weightwire.manifest import Manifest


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def manifest(epoch: str, weight_id: int) -> Manifest:
    return Manifest(epoch=epoch, weight_id=weight_id, treedef=None, leaves=())


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def state(clock: Clock) -> CoordinatorState:
    s = CoordinatorState(clock)
    s.register_server("e1", "trainer-a:5000")
    return s


def test_a_ticket_is_offered_only_after_the_server_offers(state: CoordinatorState) -> None:
    state.publish("e1", 1, manifest("e1", 1))
    rid = state.request("c1", "e1", 1)
    assert state.ticket(rid).status == "pending"
    assert state.take_requests("e1") == [(rid, 1)]
    assert state.ticket(rid).status == "offering" and state.ticket(rid).uuid == 0
    assert state.take_requests("e1") == []  # taken once
    state.offer("e1", rid, 77, 60.0)
    ticket = state.ticket(rid)
    assert (ticket.status, ticket.uuid, ticket.address) == ("offered", 77, "trainer-a:5000")
    state.finish(rid)
    with pytest.raises(LookupError):
        state.ticket(rid)


def test_no_ticket_without_a_registered_server(clock: Clock) -> None:
    state = CoordinatorState(clock)
    with pytest.raises(LookupError, match="no trainer"):
        state.request("c1", "e1", 1)
    assert state.latest() is None


def test_ids_only_grow_within_an_epoch(state: CoordinatorState) -> None:
    assert state.publish("e1", 5, manifest("e1", 5))
    assert not state.publish("e1", 5, manifest("e1", 5))
    assert not state.publish("e1", 3, manifest("e1", 3))
    assert state.latest().weight_id == 5  # type: ignore[union-attr]


def test_a_new_epoch_replaces_the_old_and_fails_its_tickets(state: CoordinatorState) -> None:
    state.publish("e1", 9, manifest("e1", 9))
    rid = state.request("c1", "e1", 9)
    state.register_server("e2", "trainer-b:6000")
    assert state.ticket(rid).status == "failed" and "replaced" in state.ticket(rid).reason
    assert state.latest() is None
    assert state.publish("e2", 1, manifest("e2", 1))  # lower ids are fine in the new epoch
    with pytest.raises(LookupError):
        state.publish("e1", 10, manifest("e1", 10))  # the old trainer can no longer publish


def test_refused_and_expired_tickets(state: CoordinatorState, clock: Clock) -> None:
    state.publish("e1", 1, manifest("e1", 1))
    r1, r2 = state.request("c1", "e1", 1), state.request("c2", "e1", 1)
    state.take_requests("e1")
    state.refuse("e1", r1, "superseded")
    state.offer("e1", r2, 5, 10.0)
    assert state.ticket(r1).status == "refused"
    clock.now += 11.0
    state.take_requests("e1")  # heartbeat keeps the server alive
    assert state.ticket(r2).status == "expired"


def test_a_silent_server_fails_waiting_tickets(state: CoordinatorState, clock: Clock) -> None:
    state.publish("e1", 1, manifest("e1", 1))
    rid = state.request("c1", "e1", 1)
    clock.now += SERVER_SILENCE_S + 1
    ticket = state.ticket(rid)
    assert ticket.status == "failed" and "trainer-a:5000" in ticket.reason


def test_an_offer_for_a_ticket_the_client_gave_up_is_ignored(state: CoordinatorState) -> None:
    state.publish("e1", 1, manifest("e1", 1))
    rid = state.request("c1", "e1", 1)
    state.take_requests("e1")
    state.finish(rid)
    state.offer("e1", rid, 5, 10.0)  # no error, no resurrected ticket
    assert state.tickets() == []


def test_a_replaced_trainer_stops_counting_as_a_user(clock: Clock) -> None:
    state = CoordinatorState(clock)
    state.attach("server-e1")
    state.register_server("e1", "trainer-a:5000", "server-e1")
    state.attach("client")
    state.attach("server-e2")  # the restarted trainer; e1 crashed without detaching
    state.register_server("e2", "trainer-b:6000", "server-e2")
    assert state.detach("client") == 1 and state.detach("server-e2") == 0


def test_users_attach_and_detach(state: CoordinatorState) -> None:
    assert state.attach("a") == 1 and state.attach("b") == 2 and state.attach("a") == 2
    assert state.detach("a") == 1 and state.detach("a") == 1 and state.detach("b") == 0


def test_settled_tickets_of_clients_that_never_finished_are_forgotten(state: CoordinatorState, clock: Clock) -> None:
    from weightwire.coordinator import SETTLED_TTL_S

    state.publish("e1", 1, manifest("e1", 1))
    rid = state.request("c1", "e1", 1)
    state.take_requests("e1")
    state.refuse("e1", rid, "superseded")
    state.take_requests("e1")  # notices it settled
    clock.now += SETTLED_TTL_S + 1
    state.take_requests("e1")
    assert state.tickets() == []


def test_the_newest_version_is_what_the_version_socket_sends(state: CoordinatorState) -> None:
    from weightwire.coordinator import VERSION_HEADER, encode_version

    def decode(reply: bytes) -> tuple[str, int] | None:
        weight_id, size = VERSION_HEADER.unpack(reply[:VERSION_HEADER.size])
        assert len(reply) == VERSION_HEADER.size + size
        return None if weight_id < 0 else (reply[VERSION_HEADER.size:].decode(), weight_id)

    assert state.latest_version() is None and decode(encode_version(None)) is None
    state.publish("e1", 3, manifest("e1", 3))
    assert state.latest_version() == ("e1", 3)
    assert decode(encode_version(state.latest_version())) == ("e1", 3)
    assert decode(encode_version(("époque-" + "x" * 70000, 2**62))) == ("époque-" + "x" * 70000, 2**62)
    state.register_server("e2", "trainer-b:6000")  # a restart: nothing of e2 is published yet
    assert state.latest_version() is None
