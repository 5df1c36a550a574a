"""The public low-level address API: listeners that stay bound, address parsing and formatting,
and the address a peer should use to reach this host.

Trainer images call this directly, so every function validates its input and names it in the
error. Hostnames are resolved here, explicitly, to numeric addresses; the native core only ever
sees numeric hosts, so a name can never silently become a wildcard bind.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import socket
import time
from dataclasses import dataclass
from types import TracebackType

from weightwire import _native
from weightwire._checks import int_arg, seconds_arg

logger = logging.getLogger(__name__)

__all__ = [
    "Interface",
    "Listener",
    "advertise",
    "bind",
    "connect",
    "format_address",
    "interfaces",
    "local_address",
    "parse_address",
    "probe",
    "resolve_host",
]

DEFAULT_BACKLOG = 128

# Destinations used only to ask the routing table which source address the default route uses.
# They are documentation ranges (RFC 5737, RFC 3849): a UDP connect sends no packet anywhere.
_ROUTE_PROBES: dict[int, str] = {socket.AF_INET: "198.51.100.1", socket.AF_INET6: "2001:db8::1"}

_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True)
class Interface:
    """One address of one network interface."""

    name: str
    family: str  # "ipv4" or "ipv6"
    address: str
    is_loopback: bool
    is_up: bool


def _family_name(family: int) -> str:
    return "ipv6" if family == socket.AF_INET6 else "ipv4"


def _ip_or_none(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _check_host(host: str, context: str) -> str:
    """Validates `host` (an IP literal or a hostname) and returns its canonical spelling."""
    ip = _ip_or_none(host)
    if ip is not None:
        return str(ip)
    labels = host.rstrip(".").split(".") if host else []
    if len(host) > 253 or not labels or not all(_HOSTNAME_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{context}: {host!r} is neither an IP address nor a valid hostname")
    if all(label.isdigit() for label in labels):
        raise ValueError(f"{context}: {host!r} is not a valid IPv4 address")
    return host


def _check_port(port: object, context: str) -> int:
    return int_arg(port, f"{context}: port", minimum=0, maximum=65535)


def parse_address(address: str) -> tuple[str, int]:
    """Splits "host:port" or "[v6]:port" into (host, port); hosts come back without brackets.

    IP literals are canonicalized ("0:0::1" -> "::1"); hostnames are validated, not resolved.
    """
    if not isinstance(address, str):
        raise TypeError(f"address must be a str, got {type(address).__name__}")
    context = f"bad address {address!r}"
    if address.startswith("["):
        close = address.find("]")
        if close < 0:
            raise ValueError(f"{context}: unbalanced '['")
        host, rest = address[1:close], address[close + 1 :]
        if not host:
            raise ValueError(f"{context}: missing host")
        ip = _ip_or_none(host)
        if not isinstance(ip, ipaddress.IPv6Address):
            raise ValueError(f"{context}: brackets must hold an IPv6 address")
        if not rest.startswith(":"):
            raise ValueError(f"{context}: expected ':port' after ']'")
        host, port_text = str(ip), rest[1:]
    else:
        if "]" in address:
            raise ValueError(f"{context}: unbalanced ']'")
        host, sep, port_text = address.rpartition(":")
        if not sep:
            raise ValueError(f"{context}: missing ':port'")
        if ":" in host:
            raise ValueError(f"{context}: IPv6 hosts need brackets, as in [::1]:8000")
        if not host:
            raise ValueError(f"{context}: missing host")
        host = _check_host(host, context)
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise ValueError(f"{context}: port {port_text!r} is not a number")
    return host, _check_port(int(port_text), context)


def format_address(host: str, port: int) -> str:
    """Formats (host, port) as "host:port", bracketing IPv6 hosts: the inverse of parse_address."""
    if not isinstance(host, str):
        raise TypeError(f"host must be a str, got {type(host).__name__}")
    context = f"bad address ({host!r}, {port!r})"
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not bare:
        raise ValueError(f"{context}: missing host")
    return _native.format_endpoint(_check_host(bare, context), _check_port(port, context))


def resolve_host(host: str, *, family: int = 0) -> str:
    """Returns a numeric address for `host`: IP literals as they are, names through getaddrinfo.

    Raises ValueError naming the host when it is empty or cannot be resolved: an empty host is
    never taken to mean "all interfaces" (pass "0.0.0.0" or "::" for that).
    """
    if not isinstance(host, str):
        raise TypeError(f"host must be a str, got {type(host).__name__}")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not bare:
        raise ValueError("empty host: name an address; for every interface pass '0.0.0.0' or '::'")
    ip = _ip_or_none(bare)
    if ip is not None:
        return str(ip)
    _check_host(bare, "bad host")
    try:
        infos = socket.getaddrinfo(bare, None, family, socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError(f"cannot resolve host {bare!r}: {exc}") from None
    resolved = str(infos[0][4][0])
    logger.debug("resolved %s to %s", bare, resolved)
    return resolved


class Listener:
    """A listening TCP socket bound once, for its whole life, to the port it reports.

    Binding port 0 and keeping the socket is what removes the bind-close-rebind race (another
    process taking the port in between) that makes other RL stacks fail with EADDRINUSE.
    """

    def __init__(self, native: _native.Listener) -> None:
        self._native = native

    @property
    def host(self) -> str:
        """The bound numeric host (a wildcard stays a wildcard: see routable_address)."""
        return self._native.host

    @property
    def port(self) -> int:
        return self._native.port

    @property
    def family(self) -> socket.AddressFamily:
        return socket.AddressFamily(self._native.family)

    @property
    def address(self) -> str:
        """The bound address as the socket reports it, e.g. "127.0.0.1:41234" or "[::1]:41234"."""
        return _native.format_endpoint(self.host, self.port)

    @property
    def closed(self) -> bool:
        return self._native.closed

    def routable_address(self, *, peer: str | None = None) -> str:
        """The address to hand to peers: the bound one, with a wildcard made routable."""
        return advertise(self.address, peer=peer)

    def fileno(self) -> int:
        """The listening fd, borrowed (-1 once closed); the Listener still owns it."""
        return self._native.fileno()

    def accept(self, timeout: float) -> socket.socket:
        """Waits up to `timeout` seconds for one connection and returns it as a blocking socket.

        Raises TimeoutError past the deadline and OSError(EBADF) if the listener is closed,
        including by another thread while this call waits.
        """
        timeout = seconds_arg(timeout, f"accept on {self.address}: timeout")
        fd, family, _host, _port = self._native.accept(timeout)
        return socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)

    def close(self) -> None:
        self._native.close()

    def __enter__(self) -> Listener:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else self.address
        return f"<weightwire.net.Listener {state}>"


def bind(host: str, port: int = 0, *, backlog: int = DEFAULT_BACKLOG) -> Listener:
    """Binds and listens on host:port (port 0: the kernel picks a free one) and keeps it bound.

    Port in use raises OSError with errno EADDRINUSE. A hostname is resolved first; the bound
    address is always the numeric one.
    """
    _check_port(port, f"bind {host!r}")
    int_arg(backlog, "backlog", minimum=1)
    numeric = resolve_host(host)
    return Listener(_native.Listener(numeric, port, min(backlog, socket.SOMAXCONN)))


def connect(address: str, timeout: float) -> socket.socket:
    """Connects to "host:port" within `timeout` seconds; returns a blocking socket."""
    host, port = parse_address(address)
    timeout = seconds_arg(timeout, f"connect to {address}: timeout")
    return _connect_numeric(address, resolve_host(host), port, timeout)


def _connect_numeric(address: str, numeric: str, port: int, timeout: float) -> socket.socket:
    """Connects to an already-resolved host; errors name `address` as the caller spelled it."""
    try:
        fd = _native.connect_tcp(numeric, port, timeout)
    except OSError as exc:
        if _native.format_endpoint(numeric, port) == address:
            raise
        raise type(exc)(exc.errno, f"connect to {address} ({numeric}): {exc.strerror}") from None
    family = socket.AF_INET6 if ":" in numeric else socket.AF_INET
    return socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)


def probe(address: str, timeout: float) -> float:
    """Seconds a TCP connect to `address` takes (one handshake round trip).

    Raises ConnectionRefusedError or TimeoutError whose message names the address.
    """
    host, port = parse_address(address)
    timeout = seconds_arg(timeout, f"probe {address}: timeout")
    numeric = resolve_host(host)  # before the clock starts: name resolution is not the round trip
    start = time.perf_counter()
    conn = _connect_numeric(address, numeric, port, timeout)
    elapsed = time.perf_counter() - start
    conn.close()
    return elapsed


def interfaces() -> list[Interface]:
    """Every IPv4/IPv6 address of every interface, loopback included."""
    return [
        Interface(name, _family_name(family), address, is_loopback, is_up)
        for name, family, address, is_loopback, is_up in _native.list_interfaces()
    ]


def _usable(ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
    return ip is not None and not (ip.is_unspecified or ip.is_loopback or ip.is_link_local)


def _from_interfaces(family: int, *, allow_loopback: bool) -> str:
    """An up interface's address: routable ones first, then link-local (scoped), and loopback
    only when nothing else is up. IPv4 before IPv6 unless `family` says."""
    up = [i for i in interfaces() if i.is_up]
    order = [family] if family else [socket.AF_INET, socket.AF_INET6]
    ranks = [_usable, lambda ip: ip is not None and ip.is_link_local]
    if allow_loopback:
        ranks.append(lambda ip: ip is not None and ip.is_loopback)
    for accept in ranks:
        for fam in order:
            for iface in up:
                if iface.family == _family_name(fam) and accept(_ip_or_none(iface.address)):
                    return iface.address
    raise OSError(errno.EADDRNOTAVAIL, f"no usable {'/'.join(_family_name(f) for f in order)} address on any interface")


def _route_source(destination: str) -> str | None:
    try:
        return _native.route_source(destination)
    except OSError as exc:  # no route (e.g. no default route): fall back to interfaces
        logger.debug("no route to %s: %s", destination, exc)
        return None


def _peer_host(peer: str) -> str:
    """Numeric host of a peer given as "host:port", "[v6]:port", a bare IP or a hostname."""
    if not isinstance(peer, str):
        raise TypeError(f"peer must be a str, got {type(peer).__name__}")
    bare = peer[1:-1] if peer.startswith("[") and peer.endswith("]") else peer
    if _ip_or_none(bare) is None and (":" in peer):
        bare, _ = parse_address(peer)
    return resolve_host(bare)


def local_address(peer: str | None = None, *, family: int = 0) -> str:
    """The numeric address a peer should use to reach this host.

    With `peer`: the source address the kernel would route to it. Without: the source address of
    the default route (asked with a UDP connect, which sends no packet), falling back to the
    interface list. Never a wildcard, and never loopback while a non-loopback interface is up,
    unless the peer itself is loopback. `family` (socket.AF_INET / AF_INET6) restricts the answer.
    """
    if family not in (0, socket.AF_INET, socket.AF_INET6):
        raise ValueError(f"family must be 0, socket.AF_INET or socket.AF_INET6, got {family!r}")
    if peer is not None:
        host = _peer_host(peer)
        peer_ip = ipaddress.ip_address(host)  # numeric (scope kept, which ip_address accepts)
        peer_family = socket.AF_INET6 if peer_ip.version == 6 else socket.AF_INET
        if not family or family == peer_family:
            source = _route_source(host)
            source_ip = _ip_or_none(source) if source else None
            # The kernel's answer stands, unless it is loopback for a peer that is not.
            if source and source_ip is not None and not source_ip.is_unspecified and (
                    not source_ip.is_loopback or peer_ip.is_loopback):
                return source
            if peer_ip.is_loopback:
                return _from_interfaces(family or peer_family, allow_loopback=True)
    for fam in [family] if family else [socket.AF_INET, socket.AF_INET6]:
        source = _route_source(_ROUTE_PROBES[fam])
        if source is not None and _usable(_ip_or_none(source)):
            return source
    return _from_interfaces(family, allow_loopback=True)


def advertise(address: str, *, peer: str | None = None) -> str:
    """Turns a bound address into the one to hand to peers (same port).

    A wildcard host ("0.0.0.0", "::") becomes local_address(peer) of the matching family. A
    loopback address is returned as is, unless `peer` is remote, which raises ValueError: that
    peer could never reach it.
    """
    host, port = parse_address(address)
    if port == 0:
        raise ValueError(f"cannot advertise {address!r}: port 0 is not a port peers can reach; "
                         "advertise the address the bound listener reports")
    numeric = resolve_host(host)
    ip = ipaddress.ip_address(numeric)
    if ip.is_unspecified:
        # A 0.0.0.0 socket only accepts IPv4; a "::" socket is dual-stack, so any family works.
        family = socket.AF_INET if ip.version == 4 else 0
        return format_address(local_address(peer, family=family), port)
    if ip.is_loopback and peer is not None:
        if not ipaddress.ip_address(_peer_host(peer)).is_loopback:
            raise ValueError(f"{address} is bound to loopback; peer {peer} cannot reach it. "
                             "Bind local_address() or a wildcard instead")
    return format_address(numeric, port)  # keeps an IPv6 "%scope", without which it is unusable
