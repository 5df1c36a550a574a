"""Ray plumbing shared by the modes: joining a cluster, and coordinator calls with deadlines and
typed errors."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any

from weightwire.config import TransferConfig
from weightwire.coordinator import VERSION_HEADER, VERSION_REQUEST, coordinator_actor
from weightwire.errors import CoordinatorError, TransferTimeoutError

logger = logging.getLogger(__name__)

# How long a first connect to the coordinator's version socket may take before clients give up on it.
CONNECT_TIMEOUT_S = 5.0
# Epochs are uuid4 hex strings (32 bytes); anything much longer on the version socket is garbage.
MAX_EPOCH_BYTES = 256


def ensure_ray(config: TransferConfig) -> Any:
    """The ray module, connected: to config.ray_address if given, else to the cluster this
    process already uses, else to a new local one (the embedded default)."""
    import ray

    if not ray.is_initialized():
        logger.info("connecting to Ray at %s", config.ray_address or "a new local cluster")
        ray.init(address=config.ray_address, namespace=config.ray_namespace, include_dashboard=False,
                 configure_logging=False)
    return ray


class CoordinatorClient:
    """This process's handle on the coordinator actor, attached as `user_id` until detach()."""

    def __init__(self, config: TransferConfig, user_id: str) -> None:
        self._ray = ensure_ray(config)
        self._name = config.coordinator_name
        self._timeout_s = config.timeout_s
        self._user_id = user_id
        self._version_lock = threading.Lock()
        self._version_address: str | None = None
        self._version_socket_works = True  # until a connect fails: then actor calls only
        self._idle_version_sockets: list[socket.socket] = []  # connected, no reply pending
        self._detached = False
        for attempt in (1, 2):
            try:
                self.actor = coordinator_actor(config.coordinator_name, config.ray_namespace)
            except Exception as exc:  # noqa: BLE001 - any failure to create it is a coordinator failure
                raise CoordinatorError(f"cannot create coordinator {self._name!r}: {exc}") from exc
            try:
                self.call("attach", user_id)
                return
            except CoordinatorError:
                # Found it just as its last user removed it: the second get_if_exists creates a
                # fresh one.
                if attempt == 2:
                    raise

    def get(self, ref: Any, timeout_s: float, what: str) -> Any:
        """ray.get with a deadline; Ray's failures become weightwire's errors."""
        ray = self._ray
        try:
            return ray.get(ref, timeout=max(timeout_s, 0.001))
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref)
            raise TransferTimeoutError(
                f"coordinator {self._name!r}: {what} took longer than {timeout_s:.3g} s") from None
        except ray.exceptions.RayActorError as exc:
            raise CoordinatorError(f"coordinator {self._name!r} is gone ({what}): {exc}") from None
        except ray.exceptions.RayTaskError as exc:
            raise CoordinatorError(f"coordinator {self._name!r} refused {what}: {exc.cause!r}") from None

    def call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        timeout = self._timeout_s if timeout_s is None else timeout_s
        return self.get(self.actor.call.remote(method, *args), timeout, method)

    def wait(self, method: str, *args: Any, timeout_s: float) -> Any:
        """A long-poll (wait_requests, wait_ticket, wait_newer) bounded by timeout_s, plus slack
        for the call itself."""
        # The actor answers by timeout_s; the slack only covers the reply's trip back.
        return self.get(getattr(self.actor, method).remote(*args, timeout_s), timeout_s + 1.5, method)

    def ready(self, ref: Any, timeout_s: float) -> bool:
        """Whether `ref` has its answer, waiting at most timeout_s."""
        done, _ = self._ray.wait([ref], timeout=timeout_s)
        return bool(done)

    def call_soon(self, method: str, *args: Any) -> None:
        """Fire and forget, for bookkeeping off the critical path (a failure is only logged by Ray)."""
        self.actor.call.remote(method, *args)

    def ask_latest_version(self, timeout_s: float) -> LatestVersion:
        """Asks for the newest (epoch, weight_id) and returns at once (bar a first connect, within
        timeout_s); its answer() waits for the reply, which reflects every publish that returned
        before this call. Asked on the coordinator's version socket where it can be reached (a
        round trip there costs a fraction of an actor call's, and receive_weights waits on it),
        else by an actor call."""
        conn = self._version_socket(timeout_s)
        if conn is not None:
            try:
                conn.sendall(VERSION_REQUEST)
                return LatestVersion(self, conn=conn)
            except OSError as exc:
                conn.close()
                logger.debug("coordinator %r: version socket: %s; asking the actor", self._name, exc)
        return LatestVersion(self, ref=self.actor.latest_version.remote())

    def _version_socket(self, timeout_s: float) -> socket.socket | None:
        """An idle connection to the version socket: one no other caller uses, with no reply
        pending (one left with a reply unread is closed, never reused), or None where it cannot
        be reached."""
        with self._version_lock:
            if self._idle_version_sockets:
                return self._idle_version_sockets.pop()
            if not self._version_socket_works or self._detached:
                return None
        from weightwire import net

        limit = min(timeout_s, CONNECT_TIMEOUT_S)
        try:
            if self._version_address is None:
                self._version_address = self.get(self.actor.version_address.remote(), limit, "version_address")
            conn = net.connect(self._version_address, limit)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn
        except (OSError, CoordinatorError) as exc:  # TransferTimeoutError is an OSError too
            if isinstance(exc, TimeoutError) and limit < CONNECT_TIMEOUT_S:
                return None  # the caller's deadline cut it short, not the socket: try again next time
            # Asking the actor is always correct, just slower: keep doing that from now on.
            logger.warning("coordinator %r: version socket %s unreachable (%s); checking versions by actor "
                           "calls", self._name, self._version_address, exc)
            self._version_socket_works = False
            return None

    def _reuse_version_socket(self, conn: socket.socket) -> None:
        with self._version_lock:
            if not self._detached:
                self._idle_version_sockets.append(conn)
                return
        conn.close()

    def detach(self) -> None:
        """Leaves; the last user to leave removes the coordinator."""
        with self._version_lock:
            self._detached = True
            idle, self._idle_version_sockets = self._idle_version_sockets, []
        for conn in idle:
            conn.close()
        try:
            remaining = self.call("detach", self._user_id, timeout_s=min(self._timeout_s, 10.0))
        except (CoordinatorError, TransferTimeoutError) as exc:
            logger.warning("detaching from coordinator %r: %s", self._name, exc)
            return
        if remaining == 0:
            logger.info("last user left: removing coordinator %r", self._name)
            self._ray.kill(self.actor)


class LatestVersion:
    """A question for the newest (epoch, weight_id), sent: answer() waits for the reply, abandon()
    drops it unread. Exactly one of the two releases it."""

    def __init__(self, coordinator: CoordinatorClient, *, conn: socket.socket | None = None, ref: Any = None) -> None:
        self._coordinator = coordinator
        self._conn = conn
        self._ref = ref

    def answer(self, timeout_s: float) -> tuple[str, int] | None:
        coordinator, conn, self._conn = self._coordinator, self._conn, None
        if conn is None:
            return coordinator.get(self._ref, timeout_s, "latest_version")
        deadline = time.monotonic() + timeout_s
        try:
            weight_id, size = VERSION_HEADER.unpack(_recv_exactly(conn, VERSION_HEADER.size, deadline))
            if size > MAX_EPOCH_BYTES:  # never read (or allocate) a length the peer made up
                raise ConnectionError(f"the version socket announced a {size}-byte epoch")
            epoch = _recv_exactly(conn, size, deadline).decode() if size else ""
        except TimeoutError:
            conn.close()
            raise TransferTimeoutError(f"coordinator {coordinator._name!r}: the version socket did not answer "
                                       f"within {timeout_s:.3g} s") from None
        except OSError as exc:
            conn.close()
            logger.debug("coordinator %r: version socket: %s; asking the actor", coordinator._name, exc)
            # Asked afresh, hence still after the question this answers was asked.
            return coordinator.get(coordinator.actor.latest_version.remote(), timeout_s, "latest_version")
        coordinator._reuse_version_socket(conn)
        return None if weight_id < 0 else (epoch, weight_id)

    def abandon(self) -> None:
        if self._conn is not None:
            self._conn.close()  # its reply may still come: never reuse it
            self._conn = None


def _recv_exactly(conn: socket.socket, size: int, deadline: float) -> bytes:
    data = bytearray()
    while len(data) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        conn.settimeout(left)
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionResetError("the coordinator closed the version socket")
        data += chunk
    return bytes(data)
