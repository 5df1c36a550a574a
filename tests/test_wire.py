"""The native transport's parts, without Ray or JAX: the chunk plan, frame headers, the
handshake, and the checked data path over socket pairs. Property-based (hypothesis) tests feed
the frame and handshake parsers random and mutated input for a bounded number of examples:
every one must be refused with a typed error, never crash or be accepted."""

from __future__ import annotations

import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightwire import _native, handshake
from weightwire.errors import IntegrityError
from weightwire.handshake import HandshakeError, Kind, Request, Status
from weightwire.staging import HostBuffer

pytestmark = pytest.mark.timeout(120)
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
HEADER = _native.FRAME_HEADER_SIZE
EPOCH = secrets.token_hex(16)
TAG = int(EPOCH[:16], 16)


def staged(leaves: list[bytes], chunk_bytes: int = 4096) -> tuple[Any, HostBuffer]:
    """A plan and a shared buffer holding `leaves`, checksummed as a server stages them."""
    plan = _native.ChunkPlan([len(leaf) for leaf in leaves], chunk_bytes)
    buffer = HostBuffer(max(plan.total_bytes, 1), shared=True, register_cuda=False)
    for index, leaf in enumerate(leaves):
        _native.stage_leaf(plan, buffer, index, leaf)
    return plan, buffer


@pytest.fixture
def leaves() -> list[bytes]:
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in (10_000, 1, 0, 70_000)]


# --- the chunk plan ---------------------------------------------------------------------------
def test_plan_aligns_leaves_and_never_lets_a_chunk_span_two() -> None:
    plan = _native.ChunkPlan([10, 5000, 0, 9000], 4096)
    assert plan.leaf_offsets == [0, 4096, 12288, 12288]
    assert plan.total_bytes == 12288 + 12288 and plan.num_chunks == 1 + 2 + 0 + 3
    assert all(offset % _native.LEAF_ALIGNMENT == 0 for offset in plan.leaf_offsets)


@pytest.mark.parametrize("chunk_bytes", [0, 4095, (1 << 30) + 1])
def test_plan_refuses_chunk_sizes_outside_its_range(chunk_bytes: int) -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        _native.ChunkPlan([100], chunk_bytes)


def test_plan_refuses_sizes_that_would_overflow() -> None:
    with pytest.raises(ValueError, match="2\\^62"):
        _native.ChunkPlan([1 << 62, 1 << 62], 4096)
    with pytest.raises(ValueError, match="chunks exceed the limit"):
        _native.ChunkPlan([1 << 50], 4096)
    with pytest.raises(TypeError):
        _native.ChunkPlan([-1], 4096)


def test_plan_checksums_must_match_its_chunks() -> None:
    plan = _native.ChunkPlan([10_000], 4096)
    with pytest.raises(ValueError, match="expected 3 chunk checksums, got 2"):
        plan.crcs = [1, 2]


def test_staging_records_each_chunks_crc32c(leaves: list[bytes]) -> None:
    plan, buffer = staged(leaves)
    view = memoryview(buffer)
    expected = []
    for index, leaf in enumerate(leaves):
        offset = plan.leaf_offsets[index]
        assert view[offset:offset + len(leaf)] == leaf
        expected += [_native.crc32c(leaf[at:at + 4096]) for at in range(0, len(leaf), 4096)]
    view.release()
    assert plan.crcs == expected


# --- frame headers ----------------------------------------------------------------------------
def test_a_header_checks_out_against_the_chunk_it_was_made_for(leaves: list[bytes]) -> None:
    plan, _ = staged(leaves)
    for chunk in range(plan.num_chunks):
        _native.check_frame_header(plan, chunk, _native.encode_frame_header(plan, chunk, TAG, 5), TAG, 5)


@pytest.mark.parametrize(("tag", "weight_id", "chunk", "field"), [
    (TAG + 1, 5, 0, "epoch tag"), (TAG, 6, 0, "weight_id"), (TAG, 5, 1, "offset")])
def test_a_header_for_another_version_or_chunk_is_refused(leaves: list[bytes], tag: int, weight_id: int,
                                                         chunk: int, field: str) -> None:
    plan, _ = staged(leaves)
    header = _native.encode_frame_header(plan, chunk, tag, weight_id)
    with pytest.raises(IntegrityError, match=field):
        _native.check_frame_header(plan, 0, header, TAG, 5)


@FUZZ
@given(position=st.integers(0, HEADER - 1), flip=st.integers(1, 255))
def test_any_damaged_header_byte_is_refused(position: int, flip: int) -> None:
    plan, _ = staged([b"x" * 9000])
    header = bytearray(_native.encode_frame_header(plan, 1, TAG, 3))
    header[position] ^= flip
    with pytest.raises(IntegrityError):
        _native.check_frame_header(plan, 1, bytes(header), TAG, 3)


@FUZZ
@given(data=st.binary(min_size=0, max_size=2 * HEADER))
def test_random_headers_are_refused(data: bytes) -> None:
    plan, _ = staged([b"x" * 9000])
    with pytest.raises(IntegrityError):
        _native.check_frame_header(plan, 0, data, TAG, 3)


def test_a_chunk_that_does_not_exist_is_a_value_error() -> None:
    plan, _ = staged([b"x" * 10])
    with pytest.raises(ValueError, match="chunk 1 does not exist"):
        _native.encode_frame_header(plan, 1, TAG, 0)


# --- the handshake ----------------------------------------------------------------------------
def handshake_pair(secret: bytes, req: Request) -> tuple[bytes, bytes, bytes]:
    """server nonce, client nonce, request bytes"""
    server_nonce, client_nonce = secrets.token_bytes(32), secrets.token_bytes(32)
    return server_nonce, client_nonce, handshake.request(secret, server_nonce, client_nonce, req)


REQ = Request(EPOCH, 9, 1, 4, Kind.TCP)


def test_handshake_round_trip() -> None:
    secret = handshake.new_secret()
    server_nonce, client_nonce, data = handshake_pair(secret, REQ)
    assert handshake.parse_hello(handshake.hello(server_nonce)) == server_nonce
    assert handshake.parse_request(secret, server_nonce, data) == (REQ, client_nonce)
    answer = handshake.reply(secret, server_nonce, client_nonce, REQ, Status.SUPERSEDED)
    assert handshake.parse_reply(secret, server_nonce, client_nonce, REQ, answer) is Status.SUPERSEDED


def test_a_wrong_secret_is_refused_both_ways() -> None:
    secret = handshake.new_secret()
    server_nonce, client_nonce, data = handshake_pair(handshake.new_secret(), REQ)
    with pytest.raises(HandshakeError, match="could not prove"):
        handshake.parse_request(secret, server_nonce, data)
    forged = handshake.reply(handshake.new_secret(), server_nonce, client_nonce, REQ, Status.OK)
    with pytest.raises(HandshakeError, match="server could not prove"):
        handshake.parse_reply(secret, server_nonce, client_nonce, REQ, forged)


def test_a_replayed_request_is_refused() -> None:
    secret = handshake.new_secret()
    _, _, recorded = handshake_pair(secret, REQ)
    with pytest.raises(HandshakeError):
        handshake.parse_request(secret, secrets.token_bytes(32), recorded)  # a fresh server nonce


def test_a_reply_cannot_be_moved_to_another_request() -> None:
    secret = handshake.new_secret()
    server_nonce, client_nonce, _ = handshake_pair(secret, REQ)
    answer = handshake.reply(secret, server_nonce, client_nonce, REQ, Status.OK)
    other = Request(EPOCH, 10, 1, 4, Kind.TCP)
    with pytest.raises(HandshakeError):
        handshake.parse_reply(secret, server_nonce, client_nonce, other, answer)


@pytest.mark.parametrize(("req", "match"), [
    (Request("xyz", 1, 0, 1, Kind.TCP), "32 hex digits"),
    (Request(EPOCH, 1, 2, 2, Kind.TCP), "stream 2 of 2"),
    (Request(EPOCH, 1, 0, 65, Kind.TCP), "stream 0 of 65")])
def test_malformed_requests_are_refused_before_sending(req: Request, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        req.body()


@FUZZ
@given(data=st.binary(max_size=2 * handshake.REQUEST_SIZE))
def test_random_bytes_never_pass_as_a_request(data: bytes) -> None:
    with pytest.raises(HandshakeError):
        handshake.parse_request(b"k" * 32, b"n" * 32, data)


@FUZZ
@given(data=st.binary(max_size=2 * handshake.HELLO_SIZE))
def test_random_bytes_never_pass_as_a_hello(data: bytes) -> None:
    if data == handshake.hello(data[6:]) and len(data) == handshake.HELLO_SIZE:
        return  # that is a valid hello
    with pytest.raises(HandshakeError):
        handshake.parse_hello(data)


@FUZZ
@given(position=st.integers(0, handshake.REQUEST_SIZE - 1), flip=st.integers(1, 255))
def test_any_tampered_request_byte_is_refused(position: int, flip: int) -> None:
    secret = handshake.new_secret()
    server_nonce, _, data = handshake_pair(secret, REQ)
    tampered = bytearray(data)
    tampered[position] ^= flip
    with pytest.raises(HandshakeError):
        handshake.parse_request(secret, server_nonce, bytes(tampered))


@FUZZ
@given(data=st.binary(max_size=2 * handshake.REPLY_SIZE))
def test_random_bytes_never_pass_as_a_reply(data: bytes) -> None:
    with pytest.raises(HandshakeError):
        handshake.parse_reply(b"k" * 32, b"s" * 32, b"c" * 32, REQ, data)


def test_macs_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Both MAC checks go through hmac.compare_digest (no early exit on the first differing byte)."""
    import hmac

    calls: list[int] = []
    compare = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append(len(a))
        return compare(a, b)

    monkeypatch.setattr(handshake.hmac, "compare_digest", spy)
    test_handshake_round_trip()
    assert calls == [32, 32]


# --- the data path over socket pairs ------------------------------------------------------------
@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def transfer(plan: Any, src: HostBuffer, pair: tuple[socket.socket, socket.socket], *, streams: int = 1,
             timeout: float = 10.0, **faults: int) -> tuple[HostBuffer, list[BaseException]]:
    """Sends stream 0 of `streams` on one end and receives it on the other."""
    dst = HostBuffer(max(plan.total_bytes, 1), register_cuda=False)
    sender, send_errors = in_thread(lambda: _native.send_stripe(pair[0].fileno(), plan, src, 0, streams, TAG, 1,
                                                                timeout, **faults))
    try:
        _native.recv_stripe(pair[1].fileno(), plan, dst, 0, streams, TAG, 1, timeout)
    finally:
        pair[1].shutdown(socket.SHUT_RDWR)  # a sender still stalled gives up at once
        sender.join(timeout + 5)
    return dst, send_errors


def leaf_bytes(buffer: HostBuffer, plan: Any, index: int, n: int) -> bytes:
    with memoryview(buffer) as view:
        return bytes(view[plan.leaf_offsets[index]:plan.leaf_offsets[index] + n])


def test_a_stripe_arrives_exact(leaves: list[bytes], pair: Any) -> None:
    plan, src = staged(leaves)
    dst, errors = transfer(plan, src, pair)
    assert not errors
    for index, leaf in enumerate(leaves):
        assert leaf_bytes(dst, plan, index, len(leaf)) == leaf


def test_striped_streams_together_carry_every_chunk(leaves: list[bytes]) -> None:
    plan, src = staged(leaves)
    dst = HostBuffer(plan.total_bytes, register_cuda=False)
    pairs = [socket.socketpair() for _ in range(3)]
    senders = [in_thread(lambda s=s, p=p: _native.send_stripe(p[0].fileno(), plan, src, s, 3, TAG, 1, 10.0))
               for s, p in enumerate(pairs)]
    for stream, p in enumerate(pairs):
        _native.recv_stripe(p[1].fileno(), plan, dst, stream, 3, TAG, 1, 10.0)
    for thread, errors in senders:
        thread.join(10)
        assert not errors
    for index, leaf in enumerate(leaves):
        assert leaf_bytes(dst, plan, index, len(leaf)) == leaf
    for p in pairs:
        p[0].close()
        p[1].close()


def test_a_byte_corrupted_in_flight_raises_integrity_error(leaves: list[bytes], pair: Any) -> None:
    plan, src = staged(leaves)
    with pytest.raises(IntegrityError, match="checksum mismatch in leaf 3"):
        transfer(plan, src, pair, corrupt_chunk=plan.num_chunks - 1)


def test_a_cut_connection_raises_connection_reset(leaves: list[bytes], pair: Any) -> None:
    plan, src = staged(leaves)
    with pytest.raises(ConnectionResetError, match="after 1000 of"):
        transfer(plan, src, pair, cut_after_bytes=HEADER + 1000)


def test_a_stalled_sender_times_out_by_the_deadline(leaves: list[bytes], pair: Any) -> None:
    plan, src = staged(leaves)
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="timed out"):
        transfer(plan, src, pair, timeout=1.0, stall_after_bytes=HEADER + 10)
    assert time.monotonic() - start < 1.0 + 2.0


def test_frames_of_another_version_are_refused(leaves: list[bytes], pair: Any) -> None:
    plan, src = staged(leaves)
    sender, _ = in_thread(lambda: _native.send_stripe(pair[0].fileno(), plan, src, 0, 1, TAG, 2, 10.0))
    dst = HostBuffer(plan.total_bytes, register_cuda=False)
    with pytest.raises(IntegrityError, match="weight_id is 2, expected 1"):
        _native.recv_stripe(pair[1].fileno(), plan, dst, 0, 1, TAG, 1, 10.0)
    pair[1].close()
    sender.join(10)


@settings(max_examples=60, deadline=None)
@given(stream=st.binary(max_size=3 * HEADER + 64), keep_header=st.booleans())
def test_random_streams_are_refused_without_writing_out_of_bounds(stream: bytes, keep_header: bool) -> None:
    """A hostile sender: a valid header (or none) followed by random bytes, then EOF. The receiver
    must refuse it, and never write outside the buffer (guard bytes stay untouched)."""
    plan = _native.ChunkPlan([64], 4096)
    plan.crcs = [_native.crc32c(b"\x01" * 64)]
    if keep_header:
        stream = _native.encode_frame_header(plan, 0, TAG, 1) + stream
    dst = bytearray(b"\xee" * (plan.total_bytes + 4096))
    a, b = socket.socketpair()
    with a, b:
        a.sendall(stream)
        a.shutdown(socket.SHUT_WR)
        with pytest.raises((IntegrityError, ConnectionResetError)):
            _native.recv_stripe(b.fileno(), plan, dst, 0, 1, TAG, 1, 5.0)
    assert dst[plan.total_bytes:] == b"\xee" * 4096
    assert dst[64:plan.total_bytes] == b"\xee" * (plan.total_bytes - 64)


def test_a_destination_smaller_than_the_plan_is_refused(pair: Any) -> None:
    plan = _native.ChunkPlan([10_000], 4096)
    with pytest.raises(ValueError, match="dst holds 100 bytes; the plan needs"):
        _native.recv_stripe(pair[1].fileno(), plan, bytearray(100), 0, 1, TAG, 1, 1.0)
    with pytest.raises(ValueError, match="stream 1 of 1 does not exist"):
        _native.recv_stripe(pair[1].fileno(), plan, bytearray(plan.total_bytes), 1, 1, TAG, 1, 1.0)


# --- the shared-memory read ---------------------------------------------------------------------
def test_a_shared_segment_reads_back_verified(leaves: list[bytes]) -> None:
    plan, src = staged(leaves)
    dst = HostBuffer(plan.total_bytes, register_cuda=False)
    _native.read_verified(src.fileno(), plan, dst)
    for index, leaf in enumerate(leaves):
        assert leaf_bytes(dst, plan, index, len(leaf)) == leaf


def test_a_damaged_shared_segment_raises_integrity_error(leaves: list[bytes]) -> None:
    plan, src = staged(leaves)
    with memoryview(src) as view:
        view[plan.leaf_offsets[3] + 5000] ^= 0xFF
    with pytest.raises(IntegrityError, match="checksum mismatch in leaf 3 bytes 4096..8192"):
        _native.read_verified(src.fileno(), plan, HostBuffer(plan.total_bytes, register_cuda=False))


def test_a_short_shared_segment_raises_integrity_error(leaves: list[bytes]) -> None:
    plan, src = staged(leaves)
    fd = os.memfd_create("short")
    try:
        with memoryview(src) as view:
            os.write(fd, view[:8192])  # the first two chunks of leaf 0, intact
        with pytest.raises(IntegrityError, match="ends inside leaf 0 bytes 8192..10000"):
            _native.read_verified(fd, plan, HostBuffer(plan.total_bytes, register_cuda=False))
    finally:
        os.close(fd)


def test_only_shared_buffers_have_a_descriptor() -> None:
    with pytest.raises(ValueError, match="only an open shared HostBuffer"):
        HostBuffer(4096, register_cuda=False).fileno()
    with pytest.raises(ValueError, match="page-aligned only"):
        HostBuffer(4096, alignment=1 << 16, shared=True, register_cuda=False)


def test_struct_sizes_match_the_documented_layout() -> None:
    assert HEADER == 48
    assert handshake.HELLO_SIZE == 4 + 2 + 32
    assert handshake.REQUEST_SIZE == 32 + struct.calcsize("<16sQHHB") + 32


def test_no_pickle_on_any_path_that_reads_network_or_checkpoint_bytes() -> None:
    """The modules that parse bytes from sockets, shared memory or checkpoint directories import no
    deserializer that can run code, and call no loader that can (np.load with pickles, torch.load).
    Manifests travel through Ray, the cluster's own trusted control plane."""
    import ast
    import inspect

    from weightwire import checkpoint_mode, native_mode

    unsafe_modules = {"pickle", "cloudpickle", "dill", "marshal", "shelve", "joblib"}
    for module in (handshake, native_mode, checkpoint_mode):
        tree = ast.parse(inspect.getsource(module))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert not {a.name.split(".")[0] for a in node.names} & unsafe_modules, module.__name__
            if isinstance(node, ast.ImportFrom):
                assert (node.module or "").split(".")[0] not in unsafe_modules, module.__name__
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                loader = node.func.attr in ("load", "loads")
                assert not loader or ast.unparse(node.func) in ("json.loads", "json.load"), ast.unparse(node)
