"""mode="jax": weights move device to device through jax.experimental.transfer; the coordinator
only pairs pulls with offers.

The JAX transfer server hangs forever on a pull nobody offered, does no metadata check, and only
works when both sides use the same transport count and transfer_size (DESIGN.md). So: a client
pulls only after the trainer has offered that exact pull (a ticket), checks its placeholder
(shard layout included) against the manifest first, bounds the pull with its own deadline, and
both sides start their transfer servers from the same TransferConfig.
"""

from __future__ import annotations

import datetime
import logging
import secrets
import threading
import time
from typing import Any

from weightwire import net
from weightwire.config import TransferConfig
from weightwire.errors import CoordinatorError, TransferTimeoutError, WeightTransferError
from weightwire.manifest import Manifest
from weightwire.transfer import BaseClient, BaseServer, remaining

logger = logging.getLogger(__name__)

SOURCE = "jax_transfer_server"
# How long the server's request loop waits on the coordinator per round; bounds close() too.
_POLL_S = 0.5
# An offer outlives the client's whole deadline by this much, so a pull the client may still
# make never meets an expired offer (which would hang).
_OFFER_SLACK_S = 30.0


def _start_transfer_server(config: TransferConfig) -> tuple[Any, str]:
    """A JAX transfer server on port 0 of the configured (or routable local) host, and the
    address peers should use for it."""
    import jax
    from jax.experimental import transfer

    # Numeric only: the transfer server silently binds 0.0.0.0 for a hostname.
    host = net.resolve_host(config.host) if config.host else net.local_address()
    bind = net.format_address(host, 0)
    server = transfer.start_transfer_server(
        jax.devices()[0].client, bind, [bind] * config.transport_streams,
        max_num_parallel_copies=config.max_parallel_copies, transfer_size=config.transfer_size)
    return server, net.advertise(server.address())


class JaxTransferServer(BaseServer):
    """Keeps the latest version on device and offers a pull of it to each client that asks."""

    def __init__(self, config: TransferConfig) -> None:
        self._transfer, address = _start_transfer_server(config)
        super().__init__(config, address)
        self._latest: tuple[int, list[Any], int] | None = None  # weight_id, leaves, nbytes
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_loop, name=f"weightwire-serve-{self.epoch[:8]}",
                                        daemon=True)
        self._thread.start()
        logger.info("jax transfer server %s serving epoch %s", self.address, self.epoch)

    def _snapshot(self, params: Any) -> Any:
        import jax

        # Our own device copies (dispatched asynchronously): valid even if the trainer deletes or
        # donates its arrays right after serve_weights returns.
        return jax.tree.map(lambda leaf: leaf.copy(), params)

    def _stage(self, manifest: Manifest, leaves: list[Any]) -> Manifest:
        with self._lock:  # serve_weights calls are serialized, so ids arrive in increasing order
            self._latest = (manifest.weight_id, leaves, manifest.nbytes)  # older ones: dropped
        return manifest

    def _serve_loop(self) -> None:
        while not self._stop.is_set():
            try:
                requests = self._coordinator.wait("wait_requests", self.epoch, timeout_s=_POLL_S)
                for request_id, weight_id in requests:
                    self._answer(request_id, weight_id)
            except (CoordinatorError, TransferTimeoutError) as exc:
                if self._stop.is_set():
                    return
                logger.warning("server %s: coordinator call failed: %s", self.address, exc)
                self._stop.wait(_POLL_S)
            except Exception:  # noqa: BLE001 - the loop must outlive one bad request
                logger.exception("server %s: answering a pull request failed", self.address)

    def _answer(self, request_id: int, weight_id: int) -> None:
        with self._lock:
            latest = self._latest
        if latest is None or latest[0] != weight_id:
            reason = f"weight_id {weight_id} was superseded by {'nothing' if latest is None else latest[0]}"
            self._coordinator.call("refuse", self.epoch, request_id, reason)
            self._metrics.refusals += 1
            return
        _, leaves, nbytes = latest
        pull_id = secrets.randbits(63)
        expires_in = self._config.timeout_s + _OFFER_SLACK_S
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=expires_in)
        self._transfer.await_pull(pull_id, leaves, timeout=deadline)  # offer first, then tell
        self._coordinator.call("offer", self.epoch, request_id, pull_id, expires_in)
        self._metrics.offers += 1
        self._metrics.bytes_offered += nbytes

    def _shutdown(self) -> None:
        self._stop.set()
        self._thread.join(_POLL_S + self._config.timeout_s)
        with self._lock:
            self._latest = None
        self._transfer = None  # the JAX server has no close(); dropping it releases its sockets


class JaxTransferClient(BaseClient):
    """Pulls each version from the trainer's transfer server into the placeholder's shardings."""

    source = SOURCE
    check_layout = True

    def __init__(self, config: TransferConfig, *, shardings: Any = None) -> None:
        self._transfer, self.address = _start_transfer_server(config)
        super().__init__(config, shardings=shardings)
        self._connections: dict[str, Any] = {}

    def _fetch(self, manifest: Manifest, specs: list[Any], deadline: float) -> list[Any] | None:
        ticket = self._coordinator.wait("request_ticket", self.client_id, manifest.epoch, manifest.weight_id,
                                        timeout_s=remaining(deadline))
        try:
            if ticket.status == "refused":
                return None
            if ticket.status in ("pending", "offering"):
                raise TransferTimeoutError(f"weight_id {manifest.weight_id}: the trainer made no offer "
                                           "before the deadline")
            if ticket.status != "offered":
                raise WeightTransferError(f"weight_id {manifest.weight_id}: {ticket.reason}")
            return self._pull(ticket.address, ticket.uuid, specs, manifest.weight_id, deadline)
        finally:
            self._coordinator.call_soon("finish", ticket.request_id)  # off the critical path

    def _pull(self, address: str, pull_id: int, specs: list[Any], weight_id: int, deadline: float) -> list[Any]:
        """conn.pull bounded by our own deadline: JAX's own timeout does not stop a stuck pull.

        pull() returns at once with arrays that become ready when the bytes have landed; we poll
        is_ready() on this thread instead of blocking, so a stuck pull costs no thread and no
        hang (and a pull driven from a helper thread measured 2-4x slower here).
        """
        import jax

        conn = self._connections.get(address)
        if conn is None:
            conn = self._connections[address] = self._transfer.connect(address)
        try:
            arrays = conn.pull(pull_id, specs)
            pause = 1e-4
            while not all(a.is_ready() for a in arrays):
                if time.monotonic() + pause >= deadline:
                    self._connections.pop(address, None)
                    raise TransferTimeoutError(
                        f"pull of weight_id {weight_id} from {address} did not finish by the deadline")
                time.sleep(pause)
                pause = min(pause * 2, 5e-3)  # latency stays within a few ms of completion
            return list(jax.block_until_ready(arrays))  # ready: raises the pull's error, if any
        except TransferTimeoutError:
            raise
        except Exception as exc:  # noqa: BLE001 - any failure of the pull itself
            self._connections.pop(address, None)
            raise WeightTransferError(f"pull of weight_id {weight_id} from {address} failed: {exc}") from None

    def _shutdown(self) -> None:
        self._connections.clear()
        self._transfer = None


Server = JaxTransferServer
Client = JaxTransferClient
