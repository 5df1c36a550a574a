"""weightwire.net: listeners that stay bound, address parsing, local-address discovery, probing."""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import platform
import shutil
import socket
import subprocess
import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from weightwire import net
from _support import needs_ipv6

LOOPBACK = "127.0.0.1"


def _echo_once(listener: net.Listener, payload: bytes) -> bytes:
    client = net.connect(listener.address, 5.0)
    with client, listener.accept(5.0) as server_side:
        client.sendall(payload)
        return server_side.recv(len(payload), socket.MSG_WAITALL)


# --- listeners -------------------------------------------------------------------------------

def test_port0_reports_a_port_a_client_can_connect_to() -> None:
    with net.bind(LOOPBACK) as listener:
        assert listener.port != 0
        assert listener.host == LOOPBACK
        assert listener.address == f"{LOOPBACK}:{listener.port}"
        # An independent client (the stdlib, not our connect) reaches the reported port.
        with socket.create_connection((LOOPBACK, listener.port), timeout=5) as client:
            with listener.accept(5.0) as conn:
                client.sendall(b"hello")
                assert conn.recv(5, socket.MSG_WAITALL) == b"hello"
                assert conn.getsockname()[1] == listener.port


def test_two_listeners_get_different_ports() -> None:
    with net.bind(LOOPBACK) as a, net.bind(LOOPBACK) as b:
        assert a.port != b.port


def test_port_in_use_raises_oserror_with_eaddrinuse() -> None:
    with net.bind(LOOPBACK) as listener:
        with pytest.raises(OSError) as info:
            net.bind(LOOPBACK, listener.port)
        assert info.value.errno == errno.EADDRINUSE
        assert str(listener.port) in str(info.value)


def test_listener_stays_bound_until_closed_then_the_port_is_free() -> None:
    listener = net.bind(LOOPBACK)
    port = listener.port
    assert _echo_once(listener, b"x") == b"x"
    with pytest.raises(OSError):  # still ours after serving a connection
        net.bind(LOOPBACK, port)
    listener.close()
    assert listener.closed and listener.fileno() == -1
    with net.bind(LOOPBACK, port) as again:
        assert again.port == port


def test_accept_timeout_returns_within_twice_the_timeout() -> None:
    with net.bind(LOOPBACK) as listener:
        start = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            listener.accept(0.3)
        elapsed = time.monotonic() - start
        assert 0.3 <= elapsed < 0.6
        assert listener.address in str(info.value)


@pytest.mark.parametrize("timeout", [-1.0, float("nan"), float("inf")])
def test_accept_rejects_unbounded_or_negative_timeouts(timeout: float) -> None:
    with net.bind(LOOPBACK) as listener, pytest.raises(ValueError):
        listener.accept(timeout)


_POLL_SYSCALLS = {"x86_64": {"7", "271"}, "aarch64": {"73"}}.get(platform.machine(), set())


def _blocked_in_poll(native_thread_id: int) -> bool:
    """True once the thread sits in poll()/ppoll() (read from /proc: no sleeping to find out)."""
    try:
        with open(f"/proc/self/task/{native_thread_id}/syscall") as f:
            return f.read().split(" ", 1)[0] in _POLL_SYSCALLS
    except OSError:
        return False


@pytest.mark.skipif(not _POLL_SYSCALLS, reason="poll syscall numbers unknown for this architecture")
def test_close_from_another_thread_wakes_a_waiting_accept() -> None:
    listener = net.bind(LOOPBACK)
    result: list[BaseException] = []

    def wait_for_connection() -> None:
        try:
            listener.accept(30.0)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion below
            result.append(exc)

    thread = threading.Thread(target=wait_for_connection)
    thread.start()
    deadline = time.monotonic() + 10.0
    while thread.native_id is None or not _blocked_in_poll(thread.native_id):
        assert time.monotonic() < deadline, "accept never started waiting"
        os.sched_yield()
    start = time.monotonic()
    listener.close()
    thread.join(5.0)
    assert not thread.is_alive()
    assert time.monotonic() - start < 2.0
    assert isinstance(result[0], OSError) and result[0].errno == errno.EBADF
    assert "while waiting" in str(result[0])  # the waiting path, not the already-closed one


def test_accept_on_a_closed_listener_raises_ebadf() -> None:
    listener = net.bind(LOOPBACK)
    listener.close()
    with pytest.raises(OSError) as info:
        listener.accept(1.0)
    assert info.value.errno == errno.EBADF


def test_listener_and_accepted_sockets_are_close_on_exec() -> None:
    with net.bind(LOOPBACK) as listener:
        assert fcntl.fcntl(listener.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        client = net.connect(listener.address, 5.0)
        with client, listener.accept(5.0) as conn:
            assert fcntl.fcntl(conn.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert fcntl.fcntl(client.fileno(), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert conn.getblocking() and client.getblocking()


@needs_ipv6
def test_ipv6_loopback() -> None:
    with net.bind("::1") as listener:
        assert listener.family == socket.AF_INET6
        assert listener.address == f"[::1]:{listener.port}"
        assert _echo_once(listener, b"six") == b"six"
        assert net.probe(listener.address, 5.0) > 0


def test_hostname_is_resolved_explicitly_never_a_wildcard() -> None:
    with net.bind("localhost") as listener:
        assert ipaddress.ip_address(listener.host).is_loopback


@pytest.mark.parametrize("host", ["", "[]", "no-such-host.invalid", "bad host", "-x", "256.1.1.1"])
def test_bind_rejects_bad_hosts_naming_them(host: str) -> None:
    with pytest.raises(ValueError) as info:
        net.bind(host)
    if host not in ("", "[]"):
        assert repr(host.strip("[]")) in str(info.value)


@pytest.mark.parametrize("port", [-1, 65536])
def test_bind_rejects_bad_ports(port: int) -> None:
    with pytest.raises(ValueError, match=str(port)):
        net.bind(LOOPBACK, port)


# --- parse / format --------------------------------------------------------------------------

BAD_ADDRESSES = [
    "",
    LOOPBACK,  # no port
    LOOPBACK + ":",
    ":8000",
    LOOPBACK + ":65536",
    LOOPBACK + ":-1",
    LOOPBACK + ":+80",
    LOOPBACK + ": 80",
    LOOPBACK + ":80x",
    LOOPBACK + ":\u0663",  # a non-ASCII digit
    "[::1:80",
    "::1]:80",
    "::1:80",  # IPv6 without brackets is ambiguous
    "[::1]80",
    "[]:80",
    "[127.0.0.1]:80",
    "[not-v6]:80",
    "1.2.3:80",
    "256.1.1.1:80",
    "host name:80",
    "a..b:80",
    "-leading-dash:80",
    " 127.0.0.1:80",
    "trainer\n:80",  # a trailing newline must not pass the hostname check
    LOOPBACK + "\n:80",
    LOOPBACK + ":" + "0" * 5000 + "80",
    "junk",
]


@pytest.mark.parametrize("address", BAD_ADDRESSES)
def test_parse_address_rejects_junk_naming_the_input(address: str) -> None:
    with pytest.raises(ValueError) as info:
        net.parse_address(address)
    assert repr(address) in str(info.value)


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        (LOOPBACK + ":80", (LOOPBACK, 80)),
        ("[::1]:0", ("::1", 0)),
        ("[0:0::1]:65535", ("::1", 65535)),
        ("[fe80::1%eth0]:9", ("fe80::1%eth0", 9)),
        ("trainer-0.cluster.local:8476", ("trainer-0.cluster.local", 8476)),
    ],
)
def test_parse_address_accepts_ipv4_bracketed_ipv6_and_hostnames(address: str, expected: tuple[str, int]) -> None:
    assert net.parse_address(address) == expected


@given(st.ip_addresses(), st.integers(min_value=0, max_value=65535))
def test_format_then_parse_round_trips(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    text = net.format_address(str(ip), port)
    assert text.startswith("[") == (ip.version == 6)
    assert net.parse_address(text) == (str(ip), port)


@pytest.mark.parametrize(("host", "port", "error"), [
    ("", 80, ValueError), (LOOPBACK, -1, ValueError), (LOOPBACK, 65536, ValueError),
    (LOOPBACK, "80", TypeError), (LOOPBACK, True, TypeError), (None, 80, TypeError), ("a b", 80, ValueError),
    ("evil\n", 80, ValueError),
])
def test_format_address_rejects_bad_input(host: object, port: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        net.format_address(host, port)  # type: ignore[arg-type]


# --- local address, interfaces, advertise ----------------------------------------------------

def _ip_route_get_src(destination: str) -> str | None:
    if shutil.which("ip") is None:
        return None
    out = subprocess.run(["ip", "-o", "route", "get", destination], capture_output=True, text=True)
    words = out.stdout.split()
    return words[words.index("src") + 1] if out.returncode == 0 and "src" in words else None


def _has_default_route() -> bool:
    if shutil.which("ip") is None:
        return False
    out = subprocess.run(["ip", "route", "show", "default"], capture_output=True, text=True)
    return bool(out.stdout.strip())


@pytest.mark.skipif(not _has_default_route(), reason="no IPv4 default route on this machine")
def test_local_address_matches_the_kernels_route_to_a_public_address() -> None:
    expected = _ip_route_get_src("8.8.8.8")  # a lookup only: nothing is sent
    assert expected is not None
    assert net.local_address() == expected
    assert net.local_address("8.8.8.8") == expected
    assert net.local_address("8.8.8.8:443") == expected


def test_local_address_is_never_a_wildcard_nor_loopback_while_an_interface_is_up() -> None:
    address = ipaddress.ip_address(net.local_address())
    assert not address.is_unspecified
    non_loopback_up = [i for i in net.interfaces() if i.is_up and not i.is_loopback]
    if non_loopback_up:
        assert not address.is_loopback
        assert net.local_address() in {i.address for i in non_loopback_up}


def test_local_address_for_a_loopback_peer_is_loopback() -> None:
    assert net.local_address(LOOPBACK) == LOOPBACK
    assert net.local_address(LOOPBACK + ":9") == LOOPBACK


@needs_ipv6
def test_local_address_for_an_ipv6_loopback_peer() -> None:
    assert net.local_address("::1") == "::1"
    assert net.local_address("[::1]:9") == "::1"


def test_interfaces_list_the_loopback() -> None:
    found = net.interfaces()
    lo = [i for i in found if i.address == LOOPBACK]
    assert lo and lo[0].is_loopback and lo[0].is_up and lo[0].family == "ipv4"
    assert all(i.family in ("ipv4", "ipv6") for i in found)


def test_advertise_makes_a_wildcard_bind_routable_with_the_same_port() -> None:
    with net.bind("0.0.0.0") as listener:
        assert listener.host == "0.0.0.0"
        advertised = listener.routable_address()
        host, port = net.parse_address(advertised)
        assert port == listener.port
        ip = ipaddress.ip_address(host)
        assert ip.version == 4 and not ip.is_unspecified
        assert net.probe(advertised, 5.0) > 0  # and it really reaches the listener


@needs_ipv6
def test_advertise_ipv6_wildcard() -> None:
    with net.bind("::") as listener:
        host, port = net.parse_address(listener.routable_address())
        assert port == listener.port and not ipaddress.ip_address(host).is_unspecified


def test_advertise_refuses_loopback_to_a_remote_peer_and_port_zero() -> None:
    with net.bind(LOOPBACK) as listener:
        assert net.advertise(listener.address) == listener.address
        assert net.advertise(listener.address, peer=LOOPBACK) == listener.address
        with pytest.raises(ValueError, match="loopback"):
            net.advertise(listener.address, peer="198.51.100.7")
    with pytest.raises(ValueError, match="port 0"):
        net.advertise(net.format_address("0.0.0.0", 0))


# --- connect / probe -------------------------------------------------------------------------

def test_probe_measures_a_connect_round_trip() -> None:
    with net.bind(LOOPBACK) as listener:
        seconds = net.probe(listener.address, 5.0)
        assert 0 < seconds < 5.0


def test_probe_of_a_closed_port_is_refused_naming_the_address() -> None:
    listener = net.bind(LOOPBACK)
    address = listener.address
    listener.close()  # the port is now free and nothing listens there
    with pytest.raises(ConnectionRefusedError) as info:
        net.probe(address, 5.0)
    assert address in str(info.value)


def test_probe_times_out_naming_the_address_when_syns_go_unanswered() -> None:
    # A listener whose accept queue is full drops new SYNs: the connect can only time out.
    with net.bind(LOOPBACK, backlog=1) as listener:
        fillers = []
        try:
            for _ in range(8):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex((LOOPBACK, listener.port))
                fillers.append(s)
            start = time.monotonic()
            with pytest.raises(TimeoutError) as info:
                net.probe(listener.address, 0.5)
            assert time.monotonic() - start < 1.0
            assert listener.address in str(info.value)
        finally:
            for s in fillers:
                s.close()


def test_connect_names_the_hostname_it_was_given() -> None:
    listener = net.bind(LOOPBACK)
    port = listener.port
    listener.close()
    with pytest.raises(ConnectionRefusedError, match=f"localhost:{port}"):
        net.connect(f"localhost:{port}", 5.0)


@pytest.mark.parametrize(("backlog", "error"), [("x", TypeError), (0, ValueError), (-3, ValueError)])
def test_bind_rejects_bad_backlogs(backlog: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="backlog"):
        net.bind(LOOPBACK, backlog=backlog)  # type: ignore[arg-type]


@pytest.mark.parametrize("timeout", [10**400, float("nan"), -0.5])
def test_connect_rejects_unrepresentable_timeouts_with_valueerror(timeout: float) -> None:
    with net.bind(LOOPBACK) as listener, pytest.raises(ValueError, match="timeout"):
        net.connect(listener.address, timeout)


# --- fallbacks, with the kernel's answers replaced -------------------------------------------

def _fake_host(monkeypatch: pytest.MonkeyPatch, interfaces: list[tuple[str, int, str, bool, bool]],
               routes: dict[str, str]) -> None:
    def route_source(host: str) -> str:
        if host in routes:
            return routes[host]
        raise OSError(errno.ENETUNREACH, f"route to {host}: Network is unreachable")

    monkeypatch.setattr(net._native, "list_interfaces", lambda: interfaces)
    monkeypatch.setattr(net._native, "route_source", route_source)


V4, V6 = socket.AF_INET, socket.AF_INET6
LO = [("lo", V4, LOOPBACK, True, True), ("lo", V6, "::1", True, True)]


def test_without_a_default_route_local_address_uses_an_up_interface(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_host(monkeypatch, [*LO, ("eth0", V4, "10.9.8.7", False, True), ("eth1", V4, "10.1.1.1", False, False)], {})
    assert net.local_address() == "10.9.8.7"


def test_a_link_local_only_interface_beats_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_host(monkeypatch, [*LO, ("eth0", V6, "fe80::2%eth0", False, True)], {})
    assert net.local_address() == "fe80::2%eth0"


def test_the_kernels_route_to_a_link_local_peer_is_kept_with_its_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_host(monkeypatch, [*LO, ("eth0", V4, "10.0.0.5", False, True), ("eth0", V6, "fe80::2%eth0", False, True)],
               {"fe80::9%eth0": "fe80::2%eth0", "198.51.100.1": "10.0.0.5"})
    assert net.local_address("fe80::9%eth0") == "fe80::2%eth0"
    assert net.local_address() == "10.0.0.5"


def test_only_loopback_up_answers_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_host(monkeypatch, [*LO, ("eth0", V4, "10.9.8.7", False, False)], {})
    assert net.local_address() == LOOPBACK


def test_advertise_keeps_an_ipv6_scope() -> None:
    assert net.advertise("[fe80::1%lo]:80") == "[fe80::1%lo]:80"
    assert net.parse_address("[fe80::1%lo]:80") == ("fe80::1%lo", 80)
