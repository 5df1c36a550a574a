"""The native transport's handshake: before any weight byte moves, the client proves it knows the
server's secret, and the server proves it back.

Both sides pick a fresh random nonce per connection and authenticate with HMAC-SHA256 over both
nonces and the request, so a recorded handshake cannot be replayed (the server's nonce differs
next time), and MACs are compared in constant time (hmac.compare_digest). Every message has a
fixed size: a parser reads exactly that many bytes, never a length taken from the peer. Secrets
never appear in messages, logs or reprs.

    server -> client  HELLO    magic "WWN1", protocol version (u16), server nonce (32 bytes)
    client -> server  REQUEST  client nonce, epoch (16 bytes), weight_id (u64), stream (u16),
                               streams (u16), kind (u8), HMAC(secret, "request" | nonces | body)
    server -> client  REPLY    status (u8), HMAC(secret, "reply" | nonces | request body | status)
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import secrets
import socket
import struct
from dataclasses import dataclass

from weightwire.errors import WeightTransferError

MAGIC = b"WWN1"
PROTOCOL_VERSION = 1
NONCE_BYTES = 32
SECRET_BYTES = 32
_MAC_BYTES = hashlib.sha256().digest_size
_HELLO = struct.Struct(f"<4sH{NONCE_BYTES}s")
_BODY = struct.Struct("<16sQHHB")
_REQUEST = struct.Struct(f"<{NONCE_BYTES}s{_BODY.size}s{_MAC_BYTES}s")
_REPLY = struct.Struct(f"<B{_MAC_BYTES}s")
HELLO_SIZE, REQUEST_SIZE, REPLY_SIZE = _HELLO.size, _REQUEST.size, _REPLY.size
MAX_STREAMS = 64


class HandshakeError(WeightTransferError):
    """The peer is not speaking our protocol, or could not prove it knows the secret."""


class Kind(enum.IntEnum):
    TCP = 0  # this connection then carries one stream of the version's frames
    SHARED_MEMORY = 1  # the server answers with the version's memfd (unix sockets only)


class Status(enum.IntEnum):
    OK = 0
    SUPERSEDED = 1  # the server no longer serves the requested version: ask for the newest


@dataclass(frozen=True)
class Request:
    epoch: str  # 32 lowercase hex digits (a uuid4 hex)
    weight_id: int
    stream: int
    streams: int
    kind: Kind

    def body(self) -> bytes:
        try:
            epoch = bytes.fromhex(self.epoch)
        except ValueError:
            epoch = b""
        if len(epoch) != 16:
            raise ValueError(f"epoch must be 32 hex digits, got {self.epoch!r}")
        if not 1 <= self.streams <= MAX_STREAMS or not 0 <= self.stream < self.streams:
            raise ValueError(f"stream {self.stream} of {self.streams} is not a valid stream")
        return _BODY.pack(epoch, self.weight_id, self.stream, self.streams, self.kind)


def new_secret() -> bytes:
    return secrets.token_bytes(SECRET_BYTES)


def _mac(secret: bytes, label: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"weightwire-native-" + label + b"".join(parts), hashlib.sha256).digest()


def hello(server_nonce: bytes) -> bytes:
    return _HELLO.pack(MAGIC, PROTOCOL_VERSION, server_nonce)


def parse_hello(data: bytes) -> bytes:
    """The server's nonce."""
    if len(data) != HELLO_SIZE:
        raise HandshakeError(f"hello of {len(data)} bytes, expected {HELLO_SIZE}")
    magic, version, nonce = _HELLO.unpack(data)
    if magic != MAGIC:
        raise HandshakeError(f"not a weightwire native server (magic {magic!r})")
    if version != PROTOCOL_VERSION:
        raise HandshakeError(f"server speaks protocol version {version}, this client {PROTOCOL_VERSION}")
    return bytes(nonce)


def request(secret: bytes, server_nonce: bytes, client_nonce: bytes, req: Request) -> bytes:
    body = req.body()
    return _REQUEST.pack(client_nonce, body, _mac(secret, b"request", server_nonce, client_nonce, body))


def parse_request(secret: bytes, server_nonce: bytes, data: bytes) -> tuple[Request, bytes]:
    """The authenticated request and the client's nonce; HandshakeError for anything else."""
    if len(data) != REQUEST_SIZE:
        raise HandshakeError(f"request of {len(data)} bytes, expected {REQUEST_SIZE}")
    client_nonce, body, mac = _REQUEST.unpack(data)
    # Authenticate before looking at the body: an unauthenticated peer learns nothing from errors.
    if not hmac.compare_digest(mac, _mac(secret, b"request", server_nonce, client_nonce, body)):
        raise HandshakeError("the client could not prove it knows this server's secret")
    epoch, weight_id, stream, streams, kind = _BODY.unpack(body)
    try:
        req = Request(epoch.hex(), weight_id, stream, streams, Kind(kind))
        req.body()  # the same range checks a client applies
    except ValueError as exc:
        raise HandshakeError(f"malformed request: {exc}") from None
    return req, bytes(client_nonce)


def _reply_mac(secret: bytes, server_nonce: bytes, client_nonce: bytes, req: Request, status: int) -> bytes:
    return _mac(secret, b"reply", server_nonce, client_nonce, req.body(), bytes([status]))


def reply(secret: bytes, server_nonce: bytes, client_nonce: bytes, req: Request, status: Status) -> bytes:
    return _REPLY.pack(status, _reply_mac(secret, server_nonce, client_nonce, req, status))


def parse_reply(secret: bytes, server_nonce: bytes, client_nonce: bytes, req: Request, data: bytes) -> Status:
    if len(data) != REPLY_SIZE:
        raise HandshakeError(f"reply of {len(data)} bytes, expected {REPLY_SIZE}")
    status, mac = _REPLY.unpack(data)
    if not hmac.compare_digest(mac, _reply_mac(secret, server_nonce, client_nonce, req, status)):
        raise HandshakeError("the server could not prove it knows the published secret")
    try:
        return Status(status)
    except ValueError:
        raise HandshakeError(f"unknown status {status}") from None


def recv_exact(sock: socket.socket, n: int, *, with_fds: bool = False) -> tuple[bytes, list[int]]:
    """Exactly n bytes (the socket's timeout bounds each wait), and the file descriptors that came
    with them when with_fds (unix sockets); HandshakeError if the peer closes first."""
    data, fds = bytearray(), []
    try:
        while len(data) < n:
            if with_fds:
                piece, more_fds, _, _ = socket.recv_fds(sock, n - len(data), 1)
                fds += more_fds
            else:
                piece = sock.recv(n - len(data))
            if not piece:
                raise HandshakeError(f"the peer closed the connection after {len(data)} of {n} handshake bytes")
            data += piece
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return bytes(data), fds


def client_side(sock: socket.socket, secret: bytes, req: Request) -> tuple[Status, list[int]]:
    """Runs the client's half on a connected socket (its timeout bounds every step): the
    server's answer, and the descriptors it sent (the caller closes them)."""
    server_nonce = parse_hello(recv_exact(sock, HELLO_SIZE)[0])
    client_nonce = secrets.token_bytes(NONCE_BYTES)
    sock.sendall(request(secret, server_nonce, client_nonce, req))
    data, fds = recv_exact(sock, REPLY_SIZE, with_fds=req.kind is Kind.SHARED_MEMORY)
    try:
        return parse_reply(secret, server_nonce, client_nonce, req, data), fds
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise


class ServerSide:
    """The server's half, in two steps: authenticate the request, then answer it."""

    def __init__(self, sock: socket.socket, secret: bytes) -> None:
        self._sock = sock
        self._secret = secret
        self._server_nonce = secrets.token_bytes(NONCE_BYTES)
        self._client_nonce = b""
        self.request: Request | None = None

    def authenticate(self) -> Request:
        self._sock.sendall(hello(self._server_nonce))
        self.request, self._client_nonce = parse_request(self._secret, self._server_nonce,
                                                         recv_exact(self._sock, REQUEST_SIZE)[0])
        return self.request

    def reply(self, status: Status) -> bytes:
        assert self.request is not None, "authenticate() first"
        return reply(self._secret, self._server_nonce, self._client_nonce, self.request, status)
