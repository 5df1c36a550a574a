"""What every mode shares: the server's version bookkeeping and the client's receive loop. A
mode supplies how a version is staged (server) and how its bytes are fetched (client)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from types import TracebackType
from typing import Any

from weightwire._checks import int_arg, seconds_arg
from weightwire._ray import CoordinatorClient, LatestVersion
from weightwire.api import ClientMetrics, ServerMetrics, WeightUpdate
from weightwire.config import TransferConfig
from weightwire.errors import CoordinatorError, IntegrityError, TransferTimeoutError, WeightTransferError
from weightwire.manifest import (
    Manifest,
    as_device_arrays,
    build_manifest,
    check_placeholder,
    placeholder_from_manifest,
)

logger = logging.getLogger(__name__)

# Ids travel as signed 64-bit integers (frame headers, Ray, JSON manifests).
MAX_WEIGHT_ID = (1 << 63) - 1


class BaseServer:
    """The trainer side: ids only grow within this server's epoch; each version is staged by the
    mode and then published through the coordinator."""

    def __init__(self, config: TransferConfig, address: str) -> None:
        self._config = config
        self.epoch = uuid.uuid4().hex
        self.address = address
        user_id = f"server-{self.epoch}"
        self._coordinator = CoordinatorClient(config, user_id)
        self._coordinator.call("register_server", self.epoch, self.address, user_id)
        self._lock = threading.Lock()
        # One serve_weights (or close) at a time: staging and publishing then happen in id order,
        # so the version a mode holds is always the one the coordinator announces.
        self._serve_lock = threading.Lock()
        self._last_id: int | None = None
        self._metrics = ServerMetrics()
        self._closed = False

    # --- mode hooks -------------------------------------------------------------------------
    def _snapshot(self, params: Any) -> Any:
        """The arrays to serve, safe from the trainer deleting or donating its own."""
        raise NotImplementedError

    def _stage(self, manifest: Manifest, leaves: list[Any]) -> Manifest:
        """Makes the version fetchable; returns its manifest with `location` filled in."""
        raise NotImplementedError

    def _shutdown(self) -> None:
        """Releases what the mode started."""

    # --- shared -----------------------------------------------------------------------------
    def serve_weights(self, weight_id: int, params: Any) -> bool:
        """Publishes `params` as `weight_id`. Returns False (logged) when weight_id is not above
        the last one served: ids only grow within an epoch, and the older one is ignored."""

        int_arg(weight_id, "weight_id", minimum=0, maximum=MAX_WEIGHT_ID)
        with self._serve_lock:
            if self._closed:
                raise WeightTransferError(f"server {self.address} is closed")
            return self._serve(weight_id, params)

    def _serve(self, weight_id: int, params: Any) -> bool:
        import jax

        if not self._claim(weight_id, claim=False):
            return False
        arrays = as_device_arrays(params)  # bad leaves raise here, claiming nothing
        manifest = build_manifest(arrays, epoch=self.epoch, weight_id=weight_id)
        served = self._snapshot(arrays)
        if not self._claim(weight_id, claim=True):
            return False
        return self._stage_and_publish(manifest, jax.tree.leaves(served))

    def _stage_and_publish(self, manifest: Manifest, leaves: list[Any]) -> bool:
        """Modes that stage slowly (files) override this to do it in the background."""
        return self._publish(self._stage(manifest, leaves))

    def _claim(self, weight_id: int, *, claim: bool) -> bool:
        """False (logged) if weight_id is not above the last id served; else True, recording it
        as the last one when `claim`."""
        with self._lock:
            if self._last_id is not None and weight_id <= self._last_id:
                logger.warning("serve_weights(%d) ignored: %d was already served (ids only grow within epoch %s)",
                               weight_id, self._last_id, self.epoch)
                self._metrics.versions_ignored += 1
                return False
            if claim:
                self._last_id = weight_id
            return True

    def _publish(self, manifest: Manifest) -> bool:
        if not self._coordinator.call("publish", self.epoch, manifest.weight_id, manifest):
            return False
        self._metrics.versions_published += 1
        self._metrics.last_weight_id = manifest.weight_id
        return True

    def flush(self, timeout_s: float | None = None) -> None:
        """Returns once every version served so far is published (modes that stage in the
        background override this)."""

    def metrics(self) -> ServerMetrics:
        return dataclasses.replace(self._metrics)

    def close(self) -> None:
        with self._serve_lock:
            if self._closed:
                return
            self._closed = True
        self._shutdown()
        try:
            self._coordinator.call("unregister_server", self.epoch, timeout_s=10.0)
        except (CoordinatorError, TransferTimeoutError) as exc:
            logger.warning("server %s: unregistering: %s", self.address, exc)
        self._coordinator.detach()

    def __enter__(self) -> BaseServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Announcements:
    """The coordinator's newest manifest, kept current by a long-poll in a background thread, so
    receive_weights can start fetching a new version without a round trip first. It never decides
    alone: the coordinator is asked in parallel, and a fetch overtaken by a newer version is redone
    (late clients always get the latest)."""

    POLL_S = 1.0
    STOP_CHECK_S = 0.05  # how soon close() is noticed while a long-poll is in flight

    def __init__(self, coordinator: CoordinatorClient, name: str) -> None:
        self._coordinator = coordinator
        self._newest: Manifest | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"weightwire-announce-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            seen = self._newest
            try:
                ref = self._coordinator.actor.wait_newer.remote(seen.epoch if seen else None,
                                                                seen.weight_id if seen else None, self.POLL_S)
                deadline = time.monotonic() + self.POLL_S + 5.0
                while not self._coordinator.ready(ref, self.STOP_CHECK_S):
                    if self._stop.is_set():
                        return  # the actor finishes its long-poll on its own
                    if time.monotonic() > deadline:
                        raise TransferTimeoutError("the coordinator did not answer a long-poll")
                newest = self._coordinator.get(ref, 5.0, "wait_newer")
            except Exception:  # noqa: BLE001 - coordinator trouble: receive_weights reports it
                self._stop.wait(self.POLL_S)
                continue
            if newest is not None:
                self._newest = newest

    def newest(self) -> Manifest | None:
        return self._newest

    def close(self) -> None:
        self._stop.set()
        self._thread.join(self.POLL_S + 6.0)


def _supersedes(newer: tuple[str, int] | None, than: Manifest) -> bool:
    """Whether the (epoch, weight_id) the coordinator calls newest is past `than`."""
    return newer is not None and (newer[0] != than.epoch or newer[1] > than.weight_id)


def remaining(deadline: float) -> float:
    """Seconds left before `deadline` (time.monotonic); TransferTimeoutError once it passed."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TransferTimeoutError("receive_weights passed its deadline")
    return left


class BaseClient:
    """The rollout side: finds newer versions through the coordinator and receives them into a
    placeholder's shapes, dtypes and shardings."""

    source = ""
    # Device-to-device modes move shards as they are, so the shard layouts must match; host
    # modes hold whole arrays and can place them on any sharding.
    check_layout = False

    def __init__(self, config: TransferConfig, *, shardings: Any = None) -> None:
        self._config = config
        self._shardings = shardings
        self.client_id = f"client-{uuid.uuid4().hex}"
        self._coordinator = CoordinatorClient(config, self.client_id)
        self._announcements = Announcements(self._coordinator, self.client_id[-8:])
        self._epoch: str | None = None
        self._weight_id: int | None = None
        self._metrics = ClientMetrics()
        self._closed = False
        self._checked: tuple[Any, list[Any]] | None = None  # the last check_placeholder: (what it saw, specs)

    # --- mode hooks -------------------------------------------------------------------------
    def _fetch(self, manifest: Manifest, specs: list[Any], deadline: float) -> list[Any] | None:
        """The leaves of `manifest` as arrays on specs' shardings, or None when the version was
        superseded before it could be fetched (the caller then takes the newest)."""
        raise NotImplementedError

    def _shutdown(self) -> None:
        """Releases what the mode started."""

    # --- shared -----------------------------------------------------------------------------
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

        old_params is the placeholder: its tree, shapes and dtypes (and, for mode="jax", its
        shardings' layout) must match the published manifest, or SpecMismatchError is raised
        before any byte moves. None builds the placeholder from the manifest on this client's
        shardings.
        """
        if self._closed:
            raise WeightTransferError(f"client {self.client_id} is closed")
        if not isinstance(wait, bool):
            raise TypeError(f"wait must be a bool, got {type(wait).__name__}")
        timeout = self._config.timeout_s if timeout_s is None else seconds_arg(timeout_s, "timeout_s")
        deadline = time.monotonic() + timeout
        refused: tuple[str, int] | None = None  # a version the trainer would not serve
        announced = self._announcements.newest()
        check: LatestVersion | None = None
        try:
            while True:
                check = None  # the coordinator's answer, asked in parallel with a fetch we started early
                if self._is_newer(announced):
                    manifest, announced = announced, None
                    check = self._coordinator.ask_latest_version(remaining(deadline))
                else:
                    manifest = self._coordinator.call("latest", timeout_s=remaining(deadline))
                if manifest is not None and (manifest.epoch, manifest.weight_id) == refused:
                    # Announced, yet not served (the trainer failed between staging and
                    # publishing): no point asking again until something newer is published.
                    if not wait:
                        raise WeightTransferError(f"weight_id {refused[1]} is announced but its trainer no "
                                                  "longer serves it")
                    manifest = self._coordinator.wait("wait_newer", *refused, timeout_s=remaining(deadline))
                if not self._is_newer(manifest):
                    if not wait:
                        return None
                    manifest = self._coordinator.wait("wait_newer", self._epoch, self._weight_id,
                                                      timeout_s=remaining(deadline))
                    if not self._is_newer(manifest):
                        raise TransferTimeoutError(
                            f"no weights newer than weight_id {self._weight_id} within {timeout:g} s")
                assert manifest is not None  # _is_newer(None) is False
                start = time.perf_counter()  # the transfer, not the wait for a version, is timed
                placeholder = old_params if old_params is not None else placeholder_from_manifest(
                    manifest, self._shardings)
                specs = self._specs(manifest, placeholder)
                try:
                    leaves = self._fetch(manifest, specs, deadline) if specs else []
                except (IntegrityError, TransferTimeoutError):
                    raise
                except WeightTransferError:
                    if check is None:
                        raise
                    check.abandon()
                    continue  # an announcement already overtaken (a replaced trainer): ask afresh
                if check is not None and _supersedes(check.answer(remaining(deadline)), manifest):
                    continue  # a newer version was published meanwhile: that is the one to return
                if leaves is not None:
                    return self._record(manifest, manifest.treedef.unflatten(leaves), time.perf_counter() - start)
                # Superseded between our look and our fetch: go again for the newest.
                refused = (manifest.epoch, manifest.weight_id)
        except TransferTimeoutError:
            self._metrics.timeouts += 1
            raise
        except WeightTransferError:
            self._metrics.failures += 1
            raise
        finally:
            if check is not None:
                check.abandon()  # raised between asking and reading the answer; else a no-op

    def _specs(self, manifest: Manifest, placeholder: Any) -> list[Any]:
        """check_placeholder, redone only when the manifest's tree or leaves or the placeholder's
        tree, shapes, dtypes or shardings differ from the last call's: versions of one run share
        them, and the full check costs as much as the rest of a small update's overhead."""
        import jax

        leaves, treedef = jax.tree_util.tree_flatten(placeholder)
        seen = (manifest.treedef, manifest.leaves, treedef,
                [(getattr(leaf, "shape", None), getattr(leaf, "dtype", None), getattr(leaf, "sharding", None))
                 for leaf in leaves])
        if self._checked is not None and self._checked[0] == seen:
            return self._checked[1]
        specs = check_placeholder(manifest, placeholder, check_layout=self.check_layout)
        self._checked = (seen, specs)
        return specs

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
                            source=self.source, epoch=manifest.epoch, versions_skipped=skipped)

    def metrics(self) -> ClientMetrics:
        return dataclasses.replace(self._metrics)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._announcements.close()
        self._shutdown()
        self._coordinator.detach()

    def __enter__(self) -> BaseClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
