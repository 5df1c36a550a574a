"""`python -m weightwire probe`."""

from __future__ import annotations

import json
import subprocess
import sys

from weightwire import net


def _probe(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "weightwire", "probe", *args],
                          capture_output=True, text=True, timeout=60)


def test_probe_reports_the_local_address_and_a_passing_self_test() -> None:
    result = _probe("--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["local_address"] == net.local_address()
    host, port = net.parse_address(report["self_test"]["address"])
    assert host == report["local_address"] and port > 0
    assert report["self_test"]["echo_rtt_s"] > 0
    assert any(i["is_loopback"] for i in report["interfaces"])


def test_probe_table_output() -> None:
    result = _probe()
    assert result.returncode == 0, result.stderr
    assert f"peers should use: {net.local_address()}" in result.stdout
    assert "self-test: bound" in result.stdout


def test_probe_reaches_a_live_peer_and_reports_a_dead_one() -> None:
    with net.bind("127.0.0.1") as listener:
        alive = _probe("--peer", listener.address, "--json")
        assert alive.returncode == 0, alive.stderr
        report = json.loads(alive.stdout)
        assert report["local_address"] == "127.0.0.1" and report["peer_connect_s"] > 0
        address = listener.address
    dead = _probe("--peer", address)
    assert dead.returncode == 1
    assert f"peer {address}: FAILED" in dead.stdout and "refused" in dead.stdout


def test_probe_rejects_a_malformed_peer() -> None:
    result = _probe("--peer", "[::1")
    assert result.returncode == 2
    assert "'[::1'" in result.stderr
