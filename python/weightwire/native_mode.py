"""mode="native": weightwire's own transport, from the trainer's host memory to the client's.

The server copies each version once into a shared (memfd-backed), pinned staging buffer, cut into
chunks whose CRC32C it records while copying, and publishes the manifest with its address, chunk
checksums and a per-server secret through the coordinator (which does discovery only). A client
authenticates (handshake.py), then either

- on the same host (and network namespace), receives the version's memfd over a unix socket and
  copies it out, verifying every chunk; or
- anywhere else, opens `native_streams` TCP connections and receives the chunks striped over
  them straight into its own pinned buffer, checking every frame header and chunk checksum.

A new version replaces the old one for new requests; transfers of the old one already running
finish from its buffer, which is freed when the last one ends. A client asking for a replaced
version is told so and fetches the newest. The data path runs in the C++ core without the GIL,
and every wait has a deadline.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno
import logging
import math
import os
import socket
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightwire import _native, handshake, net
from weightwire.config import TransferConfig
from weightwire.errors import StagingExhaustedError, TransferTimeoutError, WeightTransferError
from weightwire.handshake import Kind, Request, Status
from weightwire.manifest import Manifest, _dtype
from weightwire.staging import HostBuffer, StagingPool
from weightwire.transfer import BaseClient, BaseServer, remaining

logger = logging.getLogger(__name__)

SOURCE = "native"
# How long a connection may take to authenticate: a silent or garbage-sending peer is dropped
# after this, whatever the transfer timeout.
HANDSHAKE_TIMEOUT_S = 10.0
# How often the accept loops look up from a quiet listener to notice close().
_ACCEPT_POLL_S = 0.2


@dataclass(frozen=True)
class NativeLocation:
    """Where a native version is served from, and what its chunks must check out as."""

    address: str  # TCP "host:port"
    shared_memory_socket: str | None  # abstract unix socket name; None when the server offers no shm
    host_id: str | None  # equal on the same host and network namespace
    chunk_bytes: int
    chunk_crcs: tuple[int, ...]
    secret: bytes = field(repr=False)  # proves a client was told by the coordinator; never logged


@dataclass(frozen=True)
class SendFaults:
    """Test hooks: make this server misbehave on purpose (see _native.send_stripe)."""

    corrupt_chunk: int = -1
    cut_after_bytes: int = -1
    stall_after_bytes: int = -1


@dataclass(frozen=True)
class _Version:
    epoch: str
    weight_id: int
    plan: Any  # _native.ChunkPlan, read-only once staged
    buffer: HostBuffer


def epoch_tag(epoch: str) -> int:
    """The 64 bits of the epoch that every frame header carries."""
    return int(epoch[:16], 16)


def host_id() -> str | None:
    """Same value in processes that share a kernel boot and a network namespace, which is what
    the shared-memory path needs (the unix socket is abstract, hence per network namespace)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
        return f"{boot}/{os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        return None


def _on_gpu() -> bool:
    import jax

    # Registering staging with CUDA would create a CUDA context on a CPU-only job.
    return jax.default_backend() == "gpu"


class Server(BaseServer):
    def __init__(self, config: TransferConfig) -> None:
        host = net.resolve_host(config.host) if config.host else net.local_address()
        self._listener = net.bind(host)
        self._secret = handshake.new_secret()
        self._shm_listener: socket.socket | None = None
        self._shm_name: str | None = None
        self._stop = threading.Event()
        self._version: _Version | None = None
        self._conn_lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._handlers: set[threading.Thread] = set()
        self.faults = SendFaults()
        self._sending = 0  # streams being sent now; changes are announced on _sending_changed
        self._host_id = host_id()
        try:
            if config.native_shared_memory:
                self._shm_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._shm_listener.bind(f"\0weightwire-{handshake.new_secret().hex()[:32]}")
                self._shm_listener.listen(64)
                self._shm_listener.settimeout(_ACCEPT_POLL_S)
                self._shm_name = self._shm_listener.getsockname()
            super().__init__(config, net.advertise(self._listener.address))
        except BaseException:
            self._close_listeners()
            raise
        self._sending_changed = threading.Condition(self._lock)
        self._acceptors = [threading.Thread(target=self._accept_loop, args=(self._accept_tcp,),
                                            name=f"weightwire-native-accept-{self.epoch[:8]}", daemon=True)]
        if self._shm_listener is not None:
            self._acceptors.append(threading.Thread(target=self._accept_loop, args=(self._accept_shm,),
                                                    name=f"weightwire-native-shm-{self.epoch[:8]}", daemon=True))
        for thread in self._acceptors:
            thread.start()
        logger.info("native server %s serving epoch %s", self.address, self.epoch)

    # --- staging ----------------------------------------------------------------------------
    def _snapshot(self, params: Any) -> Any:
        return params  # _stage copies every byte before serve_weights returns

    def _stage(self, manifest: Manifest, leaves: list[Any]) -> Manifest:
        plan = _native.ChunkPlan([leaf.nbytes for leaf in manifest.leaves], self._config.native_chunk_bytes)
        buffer = HostBuffer(max(plan.total_bytes, 1), shared=True, register_cuda=_on_gpu())
        for index, leaf in enumerate(leaves):
            host = np.ascontiguousarray(np.asarray(leaf))  # zero-copy for CPU arrays
            _native.stage_leaf(plan, buffer, index, host.reshape(-1).view(np.uint8))
        with self._lock:
            self._version = _Version(manifest.epoch, manifest.weight_id, plan, buffer)  # the old one: dropped
        self._metrics.bytes_offered += manifest.nbytes
        location = NativeLocation(self.address, self._shm_name, self._host_id, plan.chunk_bytes, tuple(plan.crcs),
                                  self._secret)
        return dataclasses.replace(manifest, location=location)

    # --- serving ----------------------------------------------------------------------------
    def _accept_tcp(self) -> socket.socket | None:
        try:
            return self._listener.accept(_ACCEPT_POLL_S)
        except TimeoutError:
            return None

    def _accept_shm(self) -> socket.socket | None:
        assert self._shm_listener is not None
        try:
            conn, _ = self._shm_listener.accept()
        except TimeoutError:
            return None
        conn.settimeout(None)
        return conn

    def _accept_loop(self, accept: Any) -> None:
        while not self._stop.is_set():
            try:
                conn = accept()
            except OSError as exc:
                if self._stop.is_set():
                    return
                logger.warning("native server %s: accept failed: %s", self.address, exc)
                if exc.errno in (errno.EBADF, errno.EINVAL):  # that listener is gone for good
                    return
                self._stop.wait(_ACCEPT_POLL_S)
                continue
            if conn is None:
                continue
            thread = threading.Thread(target=self._handle, args=(conn,), name="weightwire-native-send", daemon=True)
            with self._conn_lock:
                if self._stop.is_set():
                    conn.close()
                    return
                self._connections.add(conn)
                self._handlers.add(thread)
            thread.start()

    def _handle(self, conn: socket.socket) -> None:
        peer = _peer_name(conn)
        side = handshake.ServerSide(conn, self._secret)
        try:
            conn.settimeout(HANDSHAKE_TIMEOUT_S)
            request = side.authenticate()
            with self._lock:
                version = self._version
            shm = conn.family == socket.AF_UNIX
            if (request.kind is Kind.SHARED_MEMORY) != shm:
                raise handshake.HandshakeError(f"a {request.kind.name} request on a {conn.family.name} socket")
            if version is None or (version.epoch, version.weight_id) != (request.epoch, request.weight_id):
                conn.sendall(side.reply(Status.SUPERSEDED))
                with self._lock:
                    self._metrics.refusals += 1
                return
            if shm:
                # A read-only descriptor of the segment: a client can map and read it, never write it.
                read_only = os.open(f"/proc/self/fd/{version.buffer.fileno()}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    socket.send_fds(conn, [side.reply(Status.OK)], [read_only])
                finally:
                    os.close(read_only)
            else:
                conn.sendall(side.reply(Status.OK))
                self._count_sending(+1)
                try:
                    _native.send_stripe(conn.fileno(), version.plan, version.buffer, request.stream, request.streams,
                                        epoch_tag(version.epoch), version.weight_id, self._config.timeout_s,
                                        **dataclasses.asdict(self.faults))
                finally:
                    self._count_sending(-1)
            if request.stream == 0:
                with self._lock:
                    self._metrics.offers += 1
        except (handshake.HandshakeError, OSError) as exc:  # a bad peer, one that went away, or close()
            if side.request is None:
                logger.warning("native server %s: dropped a connection from %s: %s", self.address, peer, exc)
            elif not self._stop.is_set():
                logger.info("native server %s: connection from %s ended early: %s", self.address, peer, exc)
        except Exception:  # noqa: BLE001 - one bad connection must never stop the server
            logger.exception("native server %s: serving %s failed", self.address, peer)
        finally:
            with self._conn_lock:
                self._connections.discard(conn)
                self._handlers.discard(threading.current_thread())
            conn.close()

    def _count_sending(self, change: int) -> None:
        with self._sending_changed:
            self._sending += change
            self._sending_changed.notify_all()

    def wait_sending(self, predicate: Any, timeout_s: float) -> bool:
        """Waits until predicate(streams being sent now) holds; False past timeout_s. For tests
        and monitoring: the count changes as streams start and end."""
        with self._sending_changed:
            return self._sending_changed.wait_for(lambda: predicate(self._sending), timeout_s)

    # --- shutdown ---------------------------------------------------------------------------
    def _close_listeners(self) -> None:
        self._listener.close()
        if self._shm_listener is not None:
            self._shm_listener.close()

    def _shutdown(self) -> None:
        self._stop.set()
        self._close_listeners()
        with self._conn_lock:
            connections, handlers = list(self._connections), list(self._handlers)
        for conn in connections:  # wakes handlers blocked in a send: they fail at once
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in [*self._acceptors, *handlers]:
            thread.join(HANDSHAKE_TIMEOUT_S)
        with self._lock:
            self._version = None


class Client(BaseClient):
    source = SOURCE

    def __init__(self, config: TransferConfig, *, shardings: Any = None) -> None:
        super().__init__(config, shardings=shardings)
        self._pool: StagingPool | None = None
        self._streams = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, config.native_streams - 1), thread_name_prefix="weightwire-native-recv")
        self._host_id = host_id()
        self._shm_unreachable: set[str] = set()  # same-host sockets that failed: TCP for those servers

    # --- staging ----------------------------------------------------------------------------
    def _staging(self, nbytes: int) -> tuple[HostBuffer, StagingPool | None]:
        """A pinned buffer of at least nbytes, and the pool to release it to (None: a one-off).
        Buffers whose arrays are still alive (jax on CPU aliases them) stay reserved, so a client
        holding many versions gets one-off buffers instead of waiting."""
        if self._pool is None or self._pool.capacity_bytes < 3 * nbytes:
            if self._pool is not None:
                self._pool.close()  # its buffers in use are freed when released
            self._pool = StagingPool(max(3 * nbytes, 1 << 20), register_cuda=_on_gpu())
            # The next version usually arrives while the caller still holds this one's arrays, so
            # it needs a second buffer: allocate it now, with the first, rather than slow down
            # the second transfer by its allocation (about 0.4 s per GiB here).
            first = self._pool.acquire(nbytes)
            try:
                self._pool.release(self._pool.acquire(nbytes))
            except MemoryError:  # then it is allocated when needed, if it can be
                logger.info("native client: no memory for a second staging buffer of %d bytes yet", nbytes)
            return first, self._pool
        try:
            return self._pool.acquire(nbytes), self._pool
        except StagingExhaustedError:
            return HostBuffer(nbytes, register_cuda=_on_gpu()), None

    # --- fetching ---------------------------------------------------------------------------
    def _fetch(self, manifest: Manifest, specs: list[Any], deadline: float) -> list[Any] | None:
        import jax

        location: NativeLocation = manifest.location
        plan = _native.ChunkPlan([leaf.nbytes for leaf in manifest.leaves], location.chunk_bytes)
        plan.crcs = list(location.chunk_crcs)
        buffer, pool = self._staging(max(plan.total_bytes, 1))
        try:
            if self._use_shared_memory(location):
                fetched = self._fetch_shared(manifest, location, plan, buffer, deadline)
                if fetched is None:  # the same-host path is not available after all
                    fetched = self._fetch_tcp(manifest, location, plan, buffer, deadline)
            else:
                fetched = self._fetch_tcp(manifest, location, plan, buffer, deadline)
            if not fetched:
                return None
            views = [_leaf_view(buffer, offset, spec) for offset, spec in zip(plan.leaf_offsets, specs, strict=True)]
            return jax.block_until_ready([jax.device_put(v, s.sharding) for v, s in zip(views, specs, strict=True)])
        finally:
            if pool is not None:
                pool.release(buffer)  # reserved while arrays aliasing it are alive

    def _use_shared_memory(self, location: NativeLocation) -> bool:
        return (self._config.native_shared_memory and location.shared_memory_socket is not None
                and location.shared_memory_socket not in self._shm_unreachable and location.host_id == self._host_id)

    def _fetch_shared(self, manifest: Manifest, location: NativeLocation, plan: Any, buffer: HostBuffer,
                      deadline: float) -> bool | None:
        """True once the version is in `buffer`, False if superseded, None if the same-host path
        cannot be used (the caller falls back to TCP)."""
        request = Request(manifest.epoch, manifest.weight_id, 0, 1, Kind.SHARED_MEMORY)
        assert location.shared_memory_socket is not None  # _use_shared_memory checked
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(min(remaining(deadline), HANDSHAKE_TIMEOUT_S))
            try:
                sock.connect(location.shared_memory_socket)
            except (ConnectionRefusedError, FileNotFoundError) as exc:
                logger.info("native client: no shared-memory path to %s (%s); using TCP", location.address, exc)
                self._shm_unreachable.add(location.shared_memory_socket)
                return None
            except OSError as exc:
                raise _transfer_error(exc, location, manifest) from None
            try:
                status, fds = self._handshake(sock, location, request, deadline)
            except OSError as exc:
                raise _transfer_error(exc, location, manifest) from None
        try:
            if status is not Status.OK:
                return False
            if len(fds) != 1:
                raise WeightTransferError(f"native server {location.address} sent {len(fds)} descriptors, expected 1")
            try:
                _native.read_verified(fds[0], plan, buffer)
            except OSError as exc:
                raise _transfer_error(exc, location, manifest) from None
            return True
        finally:
            for fd in fds:
                os.close(fd)

    def _fetch_tcp(self, manifest: Manifest, location: NativeLocation, plan: Any, buffer: HostBuffer,
                   deadline: float) -> bool:
        """True once the version is in `buffer`, False if superseded. Every stream connects and
        authenticates in its own thread, so the handshakes' round trips overlap; no stream
        receives a byte until all are answered, and then only if all were answered OK."""
        streams = self._config.native_streams
        tag = epoch_tag(manifest.epoch)
        socks: list[socket.socket] = []
        lock = threading.Lock()
        statuses: list[Status | None] = [None] * streams
        answered = threading.Barrier(streams)
        stopped = False  # set when the transfer is given up: streams not yet connected do not start

        def receive(stream: int) -> bool | None:
            """True: received; False: superseded; None: gave up because another stream failed
            (that stream raises) or the streams were not all answered by the deadline."""
            try:
                sock = self._connect(location, deadline)
                with lock:
                    socks.append(sock)
                    if stopped:
                        return None
                request = Request(manifest.epoch, manifest.weight_id, stream, streams, Kind.TCP)
                statuses[stream], _ = self._handshake(sock, location, request, deadline)
                answered.wait(remaining(deadline))
            except threading.BrokenBarrierError:
                return None
            except BaseException:
                answered.abort()  # the other streams stop waiting for this one
                raise
            if any(status is not Status.OK for status in statuses):
                return False
            _native.recv_stripe(sock.fileno(), plan, buffer, stream, streams, tag, manifest.weight_id,
                                remaining(deadline))
            return True

        others = [self._streams.submit(receive, stream) for stream in range(1, streams)]
        done = False
        try:
            outcomes = [receive(0), *(future.result() for future in others)]
            done = True
        except OSError as exc:
            raise _transfer_error(exc, location, manifest) from None
        finally:
            if not done:  # the other streams stop at once instead of at the deadline
                answered.abort()
                with lock:
                    stopped = True
                    for sock in socks:
                        _shutdown_quietly(sock)
                concurrent.futures.wait(others)
            for sock in socks:
                sock.close()
        if None in outcomes:
            raise TransferTimeoutError(f"weight_id {manifest.weight_id} from {location.address}: not every stream "
                                       "was answered by the deadline")
        return all(outcomes)

    def _connect(self, location: NativeLocation, deadline: float) -> socket.socket:
        sock = net.connect(location.address, remaining(deadline))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def _handshake(self, sock: socket.socket, location: NativeLocation, request: Request,
                   deadline: float) -> tuple[Status, list[int]]:
        sock.settimeout(min(HANDSHAKE_TIMEOUT_S, remaining(deadline)))
        return handshake.client_side(sock, location.secret, request)

    def _shutdown(self) -> None:
        self._streams.shutdown(wait=True, cancel_futures=True)
        if self._pool is not None:
            self._pool.close()


def _leaf_view(buffer: HostBuffer, offset: int, spec: Any) -> np.ndarray:
    dtype = _dtype(str(spec.dtype))
    count = math.prod(spec.shape)
    if count == 0:
        return np.empty(spec.shape, dtype)
    return np.frombuffer(memoryview(buffer), dtype=dtype, count=count, offset=offset).reshape(spec.shape)


def _peer_name(conn: socket.socket) -> str:
    if conn.family == socket.AF_UNIX:
        return "a same-host peer"
    try:
        return net.format_address(*conn.getpeername()[:2])
    except OSError:  # already gone
        return "a peer that left"


def _shutdown_quietly(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _transfer_error(exc: OSError, location: NativeLocation, manifest: Manifest) -> WeightTransferError:
    what = f"weight_id {manifest.weight_id} from {location.address}"
    if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT:
        return TransferTimeoutError(f"{what}: timed out ({exc})")
    return WeightTransferError(f"{what}: the transfer failed: {exc}")
