"""mode="jax": weights move device to device through jax.experimental.transfer; the coordinator
only pairs pulls with offers.

The JAX transfer server hangs forever on a pull nobody offered, does no metadata check, and only
works when both sides use the same transport count and transfer_size (DESIGN.md). So: a client
pulls only after the trainer has offered that exact pull (a ticket), checks its placeholder against
the manifest first, bounds the pull with its own deadline, and both sides start their transfer
servers from the same TransferConfig.
"""

from __future__ import annotations

import datetime
import logging
import secrets
import threading
import time
import uuid
from types import TracebackType
from typing import Any

from weightwire import net
from weightwire._checks import int_arg, seconds_arg
from weightwire._ray import CoordinatorClient
from weightwire.api import ClientMetrics, ServerMetrics, WeightUpdate
from weightwire.config import TransferConfig
from weightwire.errors import CoordinatorError, TransferTimeoutError, WeightTransferError
from weightwire.manifest import (
    Manifest,
    as_device_arrays,
    build_manifest,
    check_placeholder,
    placeholder_from_manifest,
)

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


class JaxTransferServer:
    """The trainer side: publishes versions and offers pulls of the latest one."""

    def __init__(self, config: TransferConfig) -> None:
        self._config = config
        self.epoch = uuid.uuid4().hex
        self._transfer, self.address = _start_transfer_server(config)
        self._coordinator = CoordinatorClient(config, f"server-{self.epoch}")
        self._coordinator.call("register_server", self.epoch, self.address)
        self._lock = threading.Lock()
        self._latest: tuple[int, list[Any], int] | None = None  # weight_id, flat arrays, nbytes
        self._metrics = ServerMetrics()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve_loop, name=f"weightwire-serve-{self.epoch[:8]}",
                                        daemon=True)
        self._thread.start()
        logger.info("jax transfer server %s serving epoch %s", self.address, self.epoch)

    def serve_weights(self, weight_id: int, params: Any) -> bool:
        """Publishes `params` as `weight_id` and returns at once; False (logged) if weight_id is
        not above the last one served, which is ignored. Later pulls get this version until a
        newer one is served."""
        import jax

        int_arg(weight_id, "weight_id", minimum=0)
        if self._stop.is_set():
            raise WeightTransferError(f"server {self.address} is closed")
        with self._lock:
            if self._latest is not None and weight_id <= self._latest[0]:
                logger.warning("serve_weights(%d) ignored: %d is already served (ids only grow within epoch %s)",
                               weight_id, self._latest[0], self.epoch)
                self._metrics.versions_ignored += 1
                return False
        # Our own copies: served arrays stay valid if the trainer deletes or donates its own.
        served = jax.tree.map(lambda leaf: leaf.copy(), as_device_arrays(params))
        manifest = build_manifest(served, epoch=self.epoch, weight_id=weight_id)
        with self._lock:
            self._latest = (weight_id, jax.tree.leaves(served), manifest.nbytes)
        if not self._coordinator.call("publish", self.epoch, weight_id, manifest):
            return False
        self._metrics.versions_published += 1
        self._metrics.last_weight_id = weight_id
        return True

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
            newest = "nothing" if latest is None else latest[0]
            reason = f"weight_id {weight_id} was superseded by {newest}"
            self._coordinator.call("refuse", self.epoch, request_id, reason)
            self._metrics.refusals += 1
            return
        _, arrays, nbytes = latest
        pull_id = secrets.randbits(63)
        expires_in = self._config.timeout_s + _OFFER_SLACK_S
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=expires_in)
        self._transfer.await_pull(pull_id, arrays, timeout=deadline)  # offer first, then tell
        self._coordinator.call("offer", self.epoch, request_id, pull_id, expires_in)
        self._metrics.offers += 1
        self._metrics.bytes_offered += nbytes

    def metrics(self) -> ServerMetrics:
        return ServerMetrics(**vars(self._metrics))

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(_POLL_S + self._config.timeout_s)
        try:
            self._coordinator.call("unregister_server", self.epoch, timeout_s=10.0)
        except (CoordinatorError, TransferTimeoutError) as exc:
            logger.warning("server %s: unregistering: %s", self.address, exc)
        self._coordinator.detach()
        with self._lock:
            self._latest = None
        self._transfer = None  # the JAX server has no close(); dropping it releases its sockets

    def __enter__(self) -> JaxTransferServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class JaxTransferClient:
    """The rollout side: receives newer versions into a placeholder's shapes and shardings."""

    def __init__(self, config: TransferConfig, *, shardings: Any = None) -> None:
        self._config = config
        self._shardings = shardings
        self.client_id = f"client-{uuid.uuid4().hex}"
        self._transfer, self.address = _start_transfer_server(config)
        self._coordinator = CoordinatorClient(config, self.client_id)
        self._connections: dict[str, Any] = {}
        self._epoch: str | None = None
        self._weight_id: int | None = None
        self._metrics = ClientMetrics()
        self._closed = False

    def _is_newer(self, manifest: Manifest | None) -> bool:
        if manifest is None:
            return False
        # A new epoch (restarted trainer) is always newer, whatever its ids: no waiting for an id
        # above the one the old epoch reached.
        return manifest.epoch != self._epoch or self._weight_id is None or manifest.weight_id > self._weight_id

    def receive_weights(self, old_params: Any = None, *, wait: bool = False,
                        timeout_s: float | None = None) -> WeightUpdate | None:
        """The newest version if it is newer than this client's, else None at once (wait=False)
        or after waiting for one (wait=True; TransferTimeoutError past the deadline).

        old_params is the placeholder: its shapes, dtypes and shardings must match the published
        manifest (SpecMismatchError otherwise, before any byte moves). None builds the placeholder
        from the manifest on this client's shardings.
        """
        if self._closed:
            raise WeightTransferError(f"client {self.client_id} is closed")
        timeout = self._config.timeout_s if timeout_s is None else seconds_arg(timeout_s, "timeout_s")
        deadline = time.monotonic() + timeout
        start = time.perf_counter()
        try:
            while True:
                manifest = self._coordinator.call("latest", timeout_s=self._remaining(deadline))
                if not self._is_newer(manifest):
                    if not wait:
                        return None
                    manifest = self._coordinator.wait("wait_newer", self._epoch, self._weight_id,
                                                      timeout_s=self._remaining(deadline))
                    if not self._is_newer(manifest):
                        raise TransferTimeoutError(
                            f"no weights newer than weight_id {self._weight_id} within {timeout:g} s")
                params = self._fetch(manifest, old_params, deadline)
                if params is not None:
                    return self._record(manifest, params, time.perf_counter() - start)
                # The version was superseded between our look and our request: take the newest.
        except TransferTimeoutError:
            self._metrics.timeouts += 1
            raise
        except WeightTransferError:
            self._metrics.failures += 1
            raise

    @staticmethod
    def _remaining(deadline: float) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TransferTimeoutError("receive_weights passed its deadline")
        return left

    def _fetch(self, manifest: Manifest, old_params: Any, deadline: float) -> Any:
        """The arrays of `manifest`, or None if the server refused because it was superseded."""
        placeholder = old_params if old_params is not None else placeholder_from_manifest(manifest, self._shardings)
        specs = check_placeholder(manifest, placeholder)
        if not specs:  # an empty tree: nothing to pull
            return manifest.treedef.unflatten([])
        request_id = self._coordinator.call("request", self.client_id, manifest.epoch, manifest.weight_id,
                                            timeout_s=self._remaining(deadline))
        try:
            ticket = self._coordinator.wait("wait_ticket", request_id, timeout_s=self._remaining(deadline))
            if ticket.status == "refused":
                return None
            if ticket.status != "offered":
                if ticket.status in ("pending", "offering"):
                    raise TransferTimeoutError(f"weight_id {manifest.weight_id}: the trainer made no offer "
                                               "before the deadline")
                raise WeightTransferError(f"weight_id {manifest.weight_id}: {ticket.reason}")
            arrays = self._pull(ticket.address, ticket.uuid, specs, manifest.weight_id, deadline)
        finally:
            try:
                self._coordinator.call("finish", request_id, timeout_s=10.0)
            except WeightTransferError as exc:
                logger.warning("releasing ticket %d: %s", request_id, exc)
        return manifest.treedef.unflatten(arrays)

    def _pull(self, address: str, pull_id: int, specs: list[Any], weight_id: int, deadline: float) -> list[Any]:
        """conn.pull bounded by our own deadline: JAX's own timeout does not stop a stuck pull."""
        import jax

        conn = self._connections.get(address)
        if conn is None:
            conn = self._connections[address] = self._transfer.connect(address)
        outcome: dict[str, Any] = {}

        def pull() -> None:
            try:
                outcome["arrays"] = jax.block_until_ready(conn.pull(pull_id, specs))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                outcome["error"] = exc

        worker = threading.Thread(target=pull, name=f"weightwire-pull-{weight_id}", daemon=True)
        worker.start()
        worker.join(self._remaining(deadline))
        if worker.is_alive():
            self._connections.pop(address, None)
            raise TransferTimeoutError(f"pull of weight_id {weight_id} from {address} did not finish by the deadline")
        if "error" in outcome:
            self._connections.pop(address, None)
            raise WeightTransferError(f"pull of weight_id {weight_id} from {address} failed: {outcome['error']}")
        return list(outcome["arrays"])

    def _record(self, manifest: Manifest, params: Any, seconds: float) -> WeightUpdate:
        skipped = 0
        if manifest.epoch == self._epoch and self._weight_id is not None:
            skipped = max(0, manifest.weight_id - self._weight_id - 1)
        self._epoch, self._weight_id = manifest.epoch, manifest.weight_id
        m = self._metrics
        m.transfers += 1
        m.bytes += manifest.nbytes
        m.seconds += seconds
        m.last_weight_id = manifest.weight_id
        m.versions_skipped += skipped
        return WeightUpdate(params=params, weight_id=manifest.weight_id, nbytes=manifest.nbytes, seconds=seconds,
                            source=SOURCE, epoch=manifest.epoch, versions_skipped=skipped)

    def metrics(self) -> ClientMetrics:
        return ClientMetrics(**vars(self._metrics))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._coordinator.detach()
        self._connections.clear()
        self._transfer = None

    def __enter__(self) -> JaxTransferClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
