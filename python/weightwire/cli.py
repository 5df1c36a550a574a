"""Command line: `python -m weightwire {probe,demo,bench}`."""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from dataclasses import asdict
from collections.abc import Sequence

from weightwire import net

SELF_TEST_TIMEOUT_S = 5.0


def _self_test(host: str) -> dict[str, object]:
    """Port-0 bind on `host`, connect, accept, and one 1-byte echo: proves the address works."""
    with net.bind(host, 0) as listener:
        start = time.perf_counter()
        client = net.connect(listener.address, SELF_TEST_TIMEOUT_S)
        connect_s = time.perf_counter() - start
        with client, listener.accept(SELF_TEST_TIMEOUT_S) as server_side:
            client.settimeout(SELF_TEST_TIMEOUT_S)
            server_side.settimeout(SELF_TEST_TIMEOUT_S)
            start = time.perf_counter()
            client.sendall(b"w")
            server_side.sendall(server_side.recv(1))
            if client.recv(1) != b"w":
                raise RuntimeError(f"self-test echo on {listener.address} returned the wrong byte")
            echo_s = time.perf_counter() - start
        return {"address": listener.address, "connect_s": connect_s, "echo_rtt_s": echo_s}


def _has_port(peer: str) -> bool:
    try:
        net.parse_address(peer)
    except ValueError:
        return False
    return True


def _probe(args: argparse.Namespace) -> int:
    ifaces = net.interfaces()
    address = net.local_address(args.peer)
    report: dict[str, object] = {
        "hostname": socket.gethostname(),
        "interfaces": [asdict(i) for i in ifaces],
        "local_address": address,
        "peer": args.peer,
    }
    try:
        report["self_test"] = _self_test(address)
        ok = True
    except OSError as exc:
        report["self_test"] = {"address": address, "error": str(exc)}
        ok = False
    if args.peer is not None and _has_port(args.peer):
        try:
            report["peer_connect_s"] = net.probe(args.peer, args.timeout)
        except (OSError, ValueError) as exc:
            report["peer_error"] = str(exc)
            ok = False
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if ok else 1
    print(f"host {report['hostname']}")
    print(f"{'interface':<12} {'family':<6} {'up':<4} {'loopback':<8} address")
    for i in ifaces:
        print(f"{i.name:<12} {i.family:<6} {'yes' if i.is_up else 'no':<4} "
              f"{'yes' if i.is_loopback else 'no':<8} {i.address}")
    target = f" (to reach {args.peer})" if args.peer else ""
    print(f"peers should use: {address}{target}")
    test = report["self_test"]
    assert isinstance(test, dict)
    if "error" in test:
        print(f"self-test FAILED on {address}: {test['error']}")
    else:
        print(f"self-test: bound {test['address']} (port 0), connect {test['connect_s'] * 1e6:.0f} us, "
              f"echo round trip {test['echo_rtt_s'] * 1e6:.0f} us")
    if "peer_connect_s" in report:
        print(f"peer {args.peer}: connect {float(report['peer_connect_s']) * 1e6:.0f} us")  # type: ignore[arg-type]
    elif "peer_error" in report:
        print(f"peer {args.peer}: FAILED: {report['peer_error']}")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weightwire", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    probe = sub.add_parser("probe", help="interfaces, the address peers should use, and a bind/connect self-test")
    probe.add_argument("--peer", help="HOST or HOST:PORT of a peer: route to it, and probe it if a port is given")
    probe.add_argument("--timeout", type=float, default=SELF_TEST_TIMEOUT_S, help="seconds for the peer probe")
    probe.add_argument("--json", action="store_true", help="print the report as JSON")
    probe.set_defaults(run=_probe)
    demo = sub.add_parser("demo", help="the main job: a trainer and rollout actors moving weights, verified")
    from weightwire import demo as demo_module

    demo_module.add_arguments(demo)
    demo.set_defaults(run=demo_module.main)
    bench = sub.add_parser("bench", help="throughput of every mode next to raw references, same run")
    from weightwire import bench as bench_module

    bench_module.add_arguments(bench)
    bench.set_defaults(run=bench_module.main)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except (ValueError, OSError) as exc:
        print(f"weightwire {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
