"""The coordinator: who serves which version, and the tickets that pair a client's pull with a
server's offer. It holds addresses, versions, manifests and tickets, never arrays.

CoordinatorState is the whole logic as a plain class (unit-tested without Ray);
coordinator_actor() wraps it in a named, detached Ray actor whose waits are asyncio long-polls.
The actor also answers one question over a plain TCP socket, the version socket: which version is
the newest. Every receive_weights asks it, and a socket round trip costs a fraction of an actor
call's.
"""

from __future__ import annotations

import itertools
import logging
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from weightwire.manifest import Manifest

logger = logging.getLogger(__name__)

# A server that has not asked for work this long is presumed dead: its pending tickets fail.
SERVER_SILENCE_S = 10.0
# Settled tickets (expired, refused, failed) are forgotten this long after they settled, even if
# their client died before saying finish().
SETTLED_TTL_S = 60.0


# The version socket's wire format: each request is one byte (any byte); each reply is the newest
# version as weight_id (int64, -1 while there is none), the epoch's length (uint32), the epoch (UTF-8).
VERSION_REQUEST = b"?"
VERSION_HEADER = struct.Struct("!qI")


def encode_version(version: tuple[str, int] | None) -> bytes:
    if version is None:
        return VERSION_HEADER.pack(-1, 0)
    epoch = version[0].encode()
    return VERSION_HEADER.pack(version[1], len(epoch)) + epoch


@dataclass
class Ticket:
    request_id: int
    client_id: str
    epoch: str
    weight_id: int
    status: str = "pending"  # pending -> offering -> offered -> done | expired | refused | failed
    address: str = ""  # the serving transfer server, once offered
    uuid: int = 0  # the pull to make, once offered
    expires_at: float = 0.0  # monotonic time after which the offer is gone
    reason: str = ""
    settled_at: float = 0.0  # when it reached a final state


@dataclass
class _Server:
    epoch: str
    address: str
    last_seen: float
    user_id: str = ""


class CoordinatorState:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._server: _Server | None = None
        self._latest: Manifest | None = None
        self._tickets: dict[int, Ticket] = {}
        self._ids = itertools.count(1)
        self._users: set[str] = set()

    # --- users --------------------------------------------------------------------------------
    def attach(self, user_id: str) -> int:
        self._users.add(user_id)
        return len(self._users)

    def detach(self, user_id: str) -> int:
        """Returns how many users remain; the last one to leave removes the coordinator."""
        self._users.discard(user_id)
        return len(self._users)

    # --- server side --------------------------------------------------------------------------
    def register_server(self, epoch: str, address: str, user_id: str = "") -> None:
        """A (re)started trainer: its epoch replaces the previous one, whose tickets fail. The
        replaced trainer (crashed, most likely) no longer counts as a user."""
        if self._server is not None and self._server.epoch != epoch:
            logger.info("epoch %s replaces %s", epoch, self._server.epoch)
            self._fail_epoch(self._server.epoch, f"trainer epoch {self._server.epoch} was replaced by {epoch}")
            self._users.discard(self._server.user_id)
            self._latest = None
        self._server = _Server(epoch, address, self._clock(), user_id)

    def unregister_server(self, epoch: str) -> None:
        if self._server is not None and self._server.epoch == epoch:
            self._fail_epoch(epoch, f"trainer epoch {epoch} shut down")
            self._server = None

    def publish(self, epoch: str, weight_id: int, manifest: Manifest) -> bool:
        """Records the newest version. Ids only grow within an epoch: an older or equal one is
        ignored (False)."""
        self._require_server(epoch)
        if self._latest is not None and self._latest.epoch == epoch and weight_id <= self._latest.weight_id:
            return False
        self._latest = manifest
        return True

    def take_requests(self, epoch: str) -> list[tuple[int, int]]:
        """(request_id, weight_id) of every ticket waiting for this server; also a heartbeat."""
        server = self._require_server(epoch)
        server.last_seen = self._clock()
        self._expire()
        taken = [t for t in self._tickets.values() if t.status == "pending" and t.epoch == epoch]
        for ticket in taken:
            ticket.status = "offering"
        return [(t.request_id, t.weight_id) for t in taken]

    def offer(self, epoch: str, request_id: int, uuid: int, expires_in_s: float) -> None:
        """The server has called await_pull(uuid): only now may the client pull."""
        server = self._require_server(epoch)
        ticket = self._tickets.get(request_id)
        if ticket is None or ticket.status != "offering":
            return  # the client gave up meanwhile; the server's offer expires on its own
        ticket.status, ticket.address, ticket.uuid = "offered", server.address, uuid
        ticket.expires_at = self._clock() + expires_in_s

    def refuse(self, epoch: str, request_id: int, reason: str) -> None:
        self._require_server(epoch)
        ticket = self._tickets.get(request_id)
        if ticket is not None and ticket.status == "offering":
            ticket.status, ticket.reason = "refused", reason

    # --- client side --------------------------------------------------------------------------
    def latest(self) -> Manifest | None:
        return self._latest

    def latest_version(self) -> tuple[str, int] | None:
        """(epoch, weight_id) of the newest version: what a client needs to check it is current."""
        return None if self._latest is None else (self._latest.epoch, self._latest.weight_id)

    def request(self, client_id: str, epoch: str, weight_id: int) -> int:
        """Asks the server of `epoch` to offer `weight_id` to this client; returns a request id."""
        if self._server is None or self._server.epoch != epoch:
            raise LookupError(f"no trainer of epoch {epoch} is registered")
        request_id = next(self._ids)
        self._tickets[request_id] = Ticket(request_id, client_id, epoch, weight_id)
        return request_id

    def ticket(self, request_id: int) -> Ticket:
        self._expire()
        ticket = self._tickets.get(request_id)
        if ticket is None:
            raise LookupError(f"unknown request {request_id}")
        server = self._server
        silent = server is None or self._clock() - server.last_seen > SERVER_SILENCE_S
        if ticket.status in ("pending", "offering") and silent:
            address = server.address if server is not None else "(none)"
            ticket.status = "failed"
            ticket.reason = f"trainer at {address} has not answered for {SERVER_SILENCE_S:g} s"
        return ticket

    def finish(self, request_id: int) -> None:
        """The client is done with this ticket (pulled, or gave up): forget it."""
        self._tickets.pop(request_id, None)

    def tickets(self) -> list[Ticket]:
        return list(self._tickets.values())

    # --- internals ----------------------------------------------------------------------------
    def _require_server(self, epoch: str) -> _Server:
        if self._server is None or self._server.epoch != epoch:
            raise LookupError(f"trainer epoch {epoch} is not the registered one")
        return self._server

    def _fail_epoch(self, epoch: str, reason: str) -> None:
        for ticket in self._tickets.values():
            if ticket.epoch == epoch and ticket.status in ("pending", "offering", "offered"):
                ticket.status, ticket.reason = "failed", reason

    def _expire(self) -> None:
        now = self._clock()
        for ticket in list(self._tickets.values()):
            if ticket.status == "offered" and now > ticket.expires_at:
                ticket.status, ticket.reason = "expired", "the offer expired before the pull finished"
            if ticket.status in ("expired", "refused", "failed"):
                if not ticket.settled_at:
                    ticket.settled_at = now
                elif now - ticket.settled_at > SETTLED_TTL_S:
                    del self._tickets[ticket.request_id]


def _newer(manifest: Manifest | None, epoch: str | None, weight_id: int | None) -> bool:
    if manifest is None:
        return False
    return epoch is None or manifest.epoch != epoch or weight_id is None or manifest.weight_id > weight_id


def coordinator_actor(name: str, namespace: str) -> Any:
    """The named coordinator actor, created if it does not exist yet (race-free: get_if_exists).

    Detached, so it outlives the process that created it: a restarted trainer and its clients find
    the same one. The last user to detach kills it.
    """
    import asyncio

    import ray

    @ray.remote(num_cpus=0)
    class CoordinatorActor:
        def __init__(self) -> None:
            self._state = CoordinatorState()
            self._changed: asyncio.Condition | None = None
            self._versions: asyncio.Future[asyncio.Server] | None = None

        def _condition(self) -> asyncio.Condition:
            if self._changed is None:  # created inside the actor's event loop
                self._changed = asyncio.Condition()
            return self._changed

        async def _call(self, method: str, *args: Any) -> Any:
            result = getattr(self._state, method)(*args)
            async with self._condition():
                self._condition().notify_all()
            return result

        async def _wait_for(self, predicate: Callable[[], Any], timeout_s: float) -> Any:
            async with self._condition():
                try:
                    await asyncio.wait_for(self._condition().wait_for(predicate), timeout_s)
                except asyncio.TimeoutError:
                    pass
            return predicate()

        async def call(self, method: str, *args: Any) -> Any:
            if method.startswith("_") or not callable(getattr(self._state, method, None)):
                raise AttributeError(f"coordinator has no method {method!r}")
            return await self._call(method, *args)

        async def wait_requests(self, epoch: str, timeout_s: float) -> list[tuple[int, int]]:
            def pending() -> bool:
                return any(t.status == "pending" and t.epoch == epoch for t in self._state.tickets())

            await self._wait_for(pending, timeout_s)
            return await self._call("take_requests", epoch)

        async def wait_ticket(self, request_id: int, timeout_s: float) -> Ticket:
            def decided() -> bool:
                return self._state.ticket(request_id).status not in ("pending", "offering")

            # Re-checked at least every second so a silent server is noticed while we wait.
            deadline = time.monotonic() + timeout_s
            while not await self._wait_for(decided, min(1.0, max(0.0, deadline - time.monotonic()))):
                if time.monotonic() >= deadline:
                    break
            return self._state.ticket(request_id)

        async def request_ticket(self, client_id: str, epoch: str, weight_id: int, timeout_s: float) -> Ticket:
            """request() and wait_ticket() in one round trip: the client's critical path."""
            request_id = await self._call("request", client_id, epoch, weight_id)
            return await self.wait_ticket(request_id, timeout_s)

        async def latest_version(self) -> tuple[str, int] | None:
            """What the version socket answers, for clients that cannot reach it. A read: it wakes
            no waiter, and the reply carries no manifest (whose ObjectRef would make the client a
            borrower of the version's bytes)."""
            return self._state.latest_version()

        async def version_address(self) -> str:
            """Where the version socket listens ("host:port"), started on first use: port 0 on
            this node's address, never a wildcard, so any peer in the cluster can use it."""
            from weightwire.net import format_address

            if self._versions is None:  # a future, so callers that overlap start one server
                self._versions = asyncio.ensure_future(
                    asyncio.start_server(self._answer_versions, ray.util.get_node_ip_address(), 0))
            host, port = (await self._versions).sockets[0].getsockname()[:2]
            return format_address(host, port)

        async def _answer_versions(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # On the actor's event loop, like every state change: a reply reflects every publish
            # that returned before its request arrived (what receive_weights' freshness needs).
            try:
                while await reader.read(1):
                    writer.write(encode_version(self._state.latest_version()))
                    await writer.drain()  # a peer that does not read stops being answered
            except ConnectionError:
                pass
            finally:
                writer.close()

        async def wait_newer(self, epoch: str | None, weight_id: int | None, timeout_s: float) -> Manifest | None:
            await self._wait_for(lambda: _newer(self._state.latest(), epoch, weight_id), timeout_s)
            return self._state.latest()

    return CoordinatorActor.options(  # type: ignore[attr-defined]
        name=name, namespace=namespace, get_if_exists=True, lifetime="detached", max_concurrency=1000
    ).remote()
