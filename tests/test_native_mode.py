"""mode="native" beyond the shared suite: faults in flight, hostile peers, dying processes, the
same-host path and its fallback, and what the server publishes. Every test bounds its runtime;
processes that die are Ray actors."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
import uuid
from typing import Any

import jax
import numpy as np
import pytest
from _actors import Rollout, Trainer, make_params, matches

import weightwire as ww
from weightwire import _native, handshake, net
from weightwire.handshake import Kind, Request, Status
from weightwire.native_mode import NativeLocation, SendFaults, epoch_tag

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(120)]
SIZE = 1 << 20  # float32 elements: 4 MiB, a few chunks per stream


def native_config(**extra: Any) -> ww.TransferConfig:
    extra = {"native_chunk_bytes": 1 << 20, "coordinator_name": f"native-{uuid.uuid4().hex[:8]}",
             "host": "127.0.0.1", "timeout_s": 30.0, **extra}
    return ww.TransferConfig(mode="native", **extra)


@pytest.fixture
def config() -> ww.TransferConfig:
    return native_config(native_shared_memory=False)


def published_location(client: Any) -> NativeLocation:
    manifest = client._coordinator.call("latest")
    assert manifest is not None
    return manifest.location


def receive_ok(client: Any, weight_id: int) -> None:
    update = client.receive_weights(None, wait=True, timeout_s=30)
    assert update is not None and update.weight_id == weight_id
    assert matches(update.params, weight_id, SIZE)


class RecordWatch(logging.Handler):
    """Sets `seen` once a record containing `text` is logged (in any thread)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text, self.seen = text, threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


@pytest.mark.parametrize(("faults", "error", "match", "timeout_s", "within_s"), [
    # A corrupted byte: IntegrityError, never the weights; retrying is fine.
    (SendFaults(corrupt_chunk=2), ww.IntegrityError, "checksum mismatch", 20.0, 20.0),
    # A cut connection is reported at once, not at the deadline.
    (SendFaults(cut_after_bytes=100_000), ww.WeightTransferError, "closed the connection", 20.0, 5.0),
    # A silent sender is given up on by the deadline (+ 2 s).
    (SendFaults(stall_after_bytes=100_000), ww.TransferTimeoutError, "timed out", 2.0, 4.0),
], ids=["corrupted byte", "cut connection", "stalled sender"])
def test_a_fault_in_flight_raises_its_typed_error_and_the_server_keeps_serving(
        server: Any, client: Any, faults: SendFaults, error: type[Exception], match: str, timeout_s: float,
        within_s: float) -> None:
    server.serve_weights(1, make_params(1, SIZE))
    server.faults = faults
    start = time.monotonic()
    with pytest.raises(error, match=match):
        client.receive_weights(None, timeout_s=timeout_s)
    assert time.monotonic() - start < within_s
    assert client.metrics().failures + client.metrics().timeouts == 1
    server.faults = SendFaults()
    receive_ok(client, 1)


def raw_connection(server: Any, weight_id: int, *, secret: bytes | None = None,
                   stream: int = 0, streams: int = 1) -> tuple[socket.socket, Status]:
    """A hand-made client connection that has done the handshake for one stream."""
    sock = net.connect(server.address, 10.0)
    sock.settimeout(10.0)
    req = Request(server.epoch, weight_id, stream, streams, Kind.TCP)
    status, _ = handshake.client_side(sock, secret if secret is not None else server._secret, req)
    return sock, status


@pytest.mark.parametrize("attack", ["wrong secret", "random bytes", "replay", "silence then close"])
def test_hostile_connections_are_dropped_and_logged_and_the_server_keeps_serving(
        server: Any, client: Any, attack: str, caplog: pytest.LogCaptureFixture) -> None:
    server.serve_weights(1, make_params(1, SIZE))
    caplog.set_level(logging.INFO, logger="weightwire.native_mode")
    dropped = RecordWatch("dropped a connection")
    logging.getLogger("weightwire.native_mode").addHandler(dropped)
    request = Request(server.epoch, 1, 0, 1, Kind.TCP)
    with net.connect(server.address, 10.0) as sock:
        sock.settimeout(10.0)
        if attack == "wrong secret":
            with pytest.raises(handshake.HandshakeError, match="closed the connection"):
                handshake.client_side(sock, handshake.new_secret(), request)
        elif attack == "random bytes":
            sock.sendall(secrets.token_bytes(4096))
        elif attack == "replay":  # a genuine request, recorded from a handshake with another nonce
            handshake.recv_exact(sock, handshake.HELLO_SIZE)
            sock.sendall(handshake.request(server._secret, secrets.token_bytes(32), secrets.token_bytes(32), request))
        if attack != "silence then close":
            rest = sock.recv(1 << 16, socket.MSG_WAITALL)  # until the server hangs up
            assert rest == b"" or (len(rest) == handshake.HELLO_SIZE and rest.startswith(handshake.MAGIC))
    try:
        assert dropped.seen.wait(15), "the server never logged the dropped connection"
    finally:
        logging.getLogger("weightwire.native_mode").removeHandler(dropped)
    receive_ok(client, 1)
    secret_forms = (server._secret.hex(), repr(server._secret))
    assert not any(form in r.getMessage() for r in caplog.records for form in secret_forms)


def test_the_secret_never_shows_in_reprs(server: Any, client: Any) -> None:
    server.serve_weights(1, make_params(1, SIZE))
    manifest = client._coordinator.call("latest")
    assert manifest.location.secret == server._secret
    for text in (repr(manifest), repr(manifest.location), str(manifest.location)):
        assert server._secret.hex() not in text and repr(server._secret) not in text


def test_the_listener_binds_the_configured_interface_never_a_wildcard(
        ray_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    with ww.create_server(native_config()) as pinned:
        assert pinned._listener.host == "127.0.0.1" and pinned.address.startswith("127.0.0.1:")
    # With no host configured the server binds the one interface local_address() picks (stubbed
    # to loopback here: tests never touch another address), not 0.0.0.0.
    monkeypatch.setattr(net, "local_address", lambda *a, **k: "127.0.0.1")
    with ww.create_server(native_config(host=None)) as default:
        assert default._listener.host == "127.0.0.1"


def test_a_version_replaced_mid_transfer_still_arrives_whole_and_new_requests_get_the_new_one(
        server: Any, client: Any) -> None:
    server.serve_weights(1, make_params(1, SIZE))
    location = published_location(client)
    sock, status = raw_connection(server, 1)
    assert status is Status.OK  # the server now sends version 1 and blocks once the socket buffers fill
    with sock:
        server.serve_weights(2, make_params(2, SIZE))  # replaces version 1 for new requests
        plan = _native.ChunkPlan([2 * 16, 4 * SIZE], location.chunk_bytes)  # leaves "b", "w"
        plan.crcs = list(location.chunk_crcs)
        dst = bytearray(plan.total_bytes)
        _native.recv_stripe(sock.fileno(), plan, dst, 0, 1, epoch_tag(server.epoch), 1, 20.0)
    got = np.frombuffer(dst, dtype=np.float32, count=SIZE, offset=plan.leaf_offsets[1])
    np.testing.assert_array_equal(got, np.asarray(make_params(1, SIZE)["w"]))
    late, status = raw_connection(server, 1)
    late.close()
    assert status is Status.SUPERSEDED
    receive_ok(client, 2)


def test_a_version_replaced_between_a_transfers_handshakes_moves_no_bytes_and_the_newest_arrives(
        server: Any, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The streams authenticate in parallel; when one is told its version was replaced, none of
    them receives anything of it, and the client goes on to the newest at once."""
    from weightwire import native_mode

    server.serve_weights(1, make_params(1, SIZE))
    handshake_of, recv_stripe = client._handshake, native_mode._native.recv_stripe
    received_ids: list[int] = []

    def replace_then_handshake(sock: Any, location: Any, request: Request, deadline: float) -> Any:
        if request.weight_id == 1 and request.stream == 1:
            server.serve_weights(2, make_params(2, SIZE))  # after stream 0's request, or before it
        return handshake_of(sock, location, request, deadline)

    def recording_recv_stripe(*args: Any) -> None:
        received_ids.append(args[6])
        recv_stripe(*args)

    monkeypatch.setattr(client, "_handshake", replace_then_handshake)
    monkeypatch.setattr(native_mode._native, "recv_stripe", recording_recv_stripe)
    start = time.monotonic()
    receive_ok(client, 2)
    assert time.monotonic() - start < 10.0  # not held until the 30 s deadline
    assert received_ids == [2, 2], received_ids  # both streams, and only of version 2
    assert server.metrics().refusals >= 1


def test_the_next_version_finds_its_staging_buffer_already_allocated(server: Any, client: Any) -> None:
    """A rollout holds the current weights while the next version arrives, so that one needs a
    second staging buffer; it is allocated with the first, not during the second transfer."""
    server.serve_weights(1, make_params(1, SIZE))
    first = client.receive_weights(None, wait=True, timeout_s=30)  # held, as a rollout holds its weights
    assert client._pool.stats().buffers == 2
    server.serve_weights(2, make_params(2, SIZE))
    second = client.receive_weights(None, wait=True, timeout_s=30)
    assert client._pool.stats().buffers == 2  # nothing allocated during the second transfer
    assert matches(first.params, 1, SIZE) and matches(second.params, 2, SIZE)


def test_a_client_killed_mid_stream_leaves_the_server_serving(ray_cluster: Any) -> None:
    config = native_config(native_shared_memory=False)
    with ww.create_server(config) as server, ww.create_client(config) as client:
        server.serve_weights(1, make_params(1, SIZE))
        server.faults = SendFaults(stall_after_bytes=200_000)  # keeps the victim mid-stream
        victim = Rollout.remote(config)
        pending = victim.receive.remote(SIZE, wait=True, timeout_s=60)
        assert server.wait_sending(lambda n: n > 0, 30), "the victim never got mid-stream"
        ray_cluster.kill(victim)
        assert server.wait_sending(lambda n: n == 0, 10), "the server never noticed the dead client"
        with pytest.raises(ray_cluster.exceptions.RayActorError):
            ray_cluster.get(pending, timeout=30)
        server.faults = SendFaults()
        receive_ok(client, 1)


def test_a_server_killed_mid_stream_fails_the_client_long_before_its_deadline(ray_cluster: Any) -> None:
    config = native_config(native_shared_memory=False)
    shm_before = set(os.listdir("/dev/shm"))
    trainer = Trainer.remote(config)
    ray_cluster.get(trainer.serve.remote(1, SIZE), timeout=60)
    ray_cluster.get(trainer.set_faults.remote(stall_after_bytes=200_000), timeout=30)
    outcome: list[BaseException] = []
    with ww.create_client(config) as client:
        def receive() -> None:
            try:
                client.receive_weights(None, wait=True, timeout_s=60)
            except BaseException as exc:  # noqa: BLE001 - checked below
                outcome.append(exc)

        thread = threading.Thread(target=receive, daemon=True)
        thread.start()
        assert ray_cluster.get(trainer.wait_sending.remote(30.0), timeout=40), "no stream ever stalled"
        killed = time.monotonic()
        ray_cluster.kill(trainer)
        thread.join(30)
        assert not thread.is_alive()
        assert time.monotonic() - killed < 10  # not the 60 s deadline
        assert len(outcome) == 1 and isinstance(outcome[0], ww.WeightTransferError)
        assert not isinstance(outcome[0], ww.IntegrityError)
    assert set(os.listdir("/dev/shm")) <= shm_before  # memfds: nothing to leak there


def test_shared_memory_is_used_on_the_same_host(ray_cluster: Any, caplog: pytest.LogCaptureFixture) -> None:
    config = native_config()
    caplog.set_level(logging.INFO, logger="weightwire.native_mode")
    with ww.create_server(config) as server, ww.create_client(config) as client:
        server.serve_weights(1, make_params(1, SIZE))
        server.faults = SendFaults(corrupt_chunk=0)  # TCP would be corrupted; shared memory is not
        receive_ok(client, 1)
        assert not any("using TCP" in r.getMessage() for r in caplog.records)


def test_the_same_host_path_falls_back_to_tcp_when_unreachable(ray_cluster: Any,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    config = native_config()
    caplog.set_level(logging.INFO, logger="weightwire.native_mode")
    with ww.create_server(config) as server, ww.create_client(config) as client:
        server._shm_listener.close()  # as if the client sat in another network namespace
        server.serve_weights(1, make_params(1, SIZE))
        receive_ok(client, 1)
        assert any("no shared-memory path" in r.getMessage() for r in caplog.records)
        server.serve_weights(2, make_params(2, SIZE))
        receive_ok(client, 2)


def test_a_damaged_shared_segment_is_never_returned(ray_cluster: Any) -> None:
    config = native_config()
    with ww.create_server(config) as server, ww.create_client(config) as client:
        server.serve_weights(1, make_params(1, SIZE))
        with memoryview(server._version.buffer) as view:
            view[12345] ^= 0x40
        with pytest.raises(ww.IntegrityError, match="checksum mismatch in leaf 1"):
            client.receive_weights(None)


def test_many_concurrent_clients_over_both_paths(ray_cluster: Any) -> None:
    config = native_config(native_streams=3)
    tcp_config = native_config(native_streams=3, native_shared_memory=False, coordinator_name=config.coordinator_name)
    trainer = Trainer.remote(config)
    rollouts = [Rollout.remote(c) for c in (config, config, tcp_config, tcp_config)]
    try:
        for weight_id in (1, 2):
            assert ray_cluster.get(trainer.serve.remote(weight_id, SIZE), timeout=60)
            results = ray_cluster.get([r.receive.remote(SIZE, wait=True, timeout_s=60) for r in rollouts], timeout=90)
            assert results == [(weight_id, True)] * len(rollouts)
    finally:
        for actor in (trainer, *rollouts):
            ray_cluster.kill(actor)


def test_config_refuses_bad_native_settings() -> None:
    with pytest.raises(ValueError, match="native_streams must be <= 64"):
        ww.TransferConfig(mode="native", native_streams=65)
    with pytest.raises(ValueError, match="native_chunk_bytes must be >= 4096"):
        ww.TransferConfig(mode="native", native_chunk_bytes=100)
    with pytest.raises(TypeError, match="native_shared_memory must be a bool"):
        ww.TransferConfig(mode="native", native_shared_memory="no")  # type: ignore[arg-type]


def test_paths_of_leaves_on_a_mesh_round_trip(server: Any, client: Any) -> None:
    """A sharded trainer array is gathered to host once, and placed on the client's sharding."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
    params = {"w": jax.device_put(np.arange(64, dtype=np.float32), sharding)}
    server.serve_weights(1, params)
    update = client.receive_weights(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                                                 params))
    assert update.params["w"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(update.params["w"]), np.arange(64, dtype=np.float32))


def test_the_shared_segment_a_client_gets_is_read_only(ray_cluster: Any) -> None:
    with ww.create_server(native_config()) as server, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        server.serve_weights(1, make_params(1, SIZE))
        sock.settimeout(10.0)
        sock.connect(server._shm_name)
        status, fds = handshake.client_side(sock, server._secret, Request(server.epoch, 1, 0, 1, Kind.SHARED_MEMORY))
    assert status is Status.OK and len(fds) == 1
    try:
        with pytest.raises(OSError):
            os.write(fds[0], b"x")
        import mmap

        with pytest.raises(PermissionError):
            mmap.mmap(fds[0], 4096, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fds[0])
