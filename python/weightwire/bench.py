"""`python -m weightwire bench`: throughput of every mode next to references measured in the
same run, between two processes (Ray actors): raw single-stream TCP, raw JAX transfer-server
pulls (one transport stream, the plain call, and mode="jax"'s stream count), ray.put/ray.get,
Arrow Flight do_get (when pyarrow is installed) and, in one process, a numpy memcpy. Every
measured transfer is checked bit-exact (CRC32C); medians over repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import secrets
import socket
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from weightwire import _native

MiB = 1 << 20
FULL_SIZES_MIB = (16, 64, 256, 1024)
QUICK_SIZES_MIB = (16, 64)
LEAVES = 8
REFERENCE = "raw TCP"
MODES = ("jax", "ray", "checkpoint", "native", "native-tcp")


@dataclass
class Measurement:
    path: str
    size_mib: int
    seconds: list[float]

    @property
    def median_gbps(self) -> float:
        return self.size_mib * MiB / statistics.median(self.seconds) / 1e9

    def as_dict(self) -> dict[str, Any]:
        ordered = sorted(self.seconds)
        nbytes = self.size_mib * MiB
        return {**asdict(self), "median_gbps": self.median_gbps, "min_gbps": nbytes / ordered[-1] / 1e9,
                "max_gbps": nbytes / ordered[0] / 1e9}


def payload(nbytes: int) -> np.ndarray:
    """Deterministic bytes both processes can build and check."""
    return (np.arange(nbytes // 4, dtype=np.uint32) * np.uint32(2654435761)).view(np.uint8)


def crc(data: Any) -> int:
    return _native.crc32c(np.ascontiguousarray(data).reshape(-1).view(np.uint8))


def tree_of(nbytes: int, weight_id: int) -> dict[str, Any]:
    import jax.numpy as jnp

    per_leaf = nbytes // LEAVES // 4
    return {f"leaf{i}": jnp.full((per_leaf,), weight_id * 100 + i, dtype=jnp.float32) for i in range(LEAVES)}


def tree_crc(tree: Any) -> int:
    import jax

    value = 0
    for leaf in jax.tree.leaves(tree):
        value = _native.crc32c(np.asarray(leaf).reshape(-1).view(np.uint8), value)
    return value


def _transfer_server(servers: dict[int, tuple[Any, str]], config: Any,
                     transport_streams: int | None) -> tuple[Any, str]:
    """A JAX transfer server with `transport_streams` data connections (None: the config's) and
    its address, started on first use and kept in `servers`."""
    from weightwire.jax_mode import _start_transfer_server

    streams = config.transport_streams if transport_streams is None else transport_streams
    if streams not in servers:
        servers[streams] = _start_transfer_server(dataclasses.replace(config, transport_streams=streams))
    return servers[streams]


def _actors() -> tuple[Any, Any]:
    import ray

    @ray.remote(num_cpus=0)
    class Sender:
        def __init__(self, config: Any) -> None:
            self.config = config
            self.server: Any = None
            self.transfers: dict[int, tuple[Any, str]] = {}  # JAX transfer servers by transport streams
            self.flight: Any = None
            self.payload: np.ndarray | None = None

        # raw TCP: one socket, sendall
        def send_tcp(self, address: str, nbytes: int) -> None:
            from weightwire import net

            if self.payload is None or self.payload.nbytes != nbytes:
                self.payload = payload(nbytes)  # built once, so timed sends only send
            data = self.payload
            with net.connect(address, 60.0) as sock:
                sock.sendall(data.data)

        # raw JAX transfer server
        def offer_pull(self, nbytes: int, transport_streams: int | None = None) -> tuple[str, int, list[Any]]:
            """An offer of a fresh tree; the receiver must pull with the same transport_streams
            (None: the config's, which mode="jax" uses)."""
            import jax

            server, address = _transfer_server(self.transfers, self.config, transport_streams)
            self.arrays = jax.block_until_ready(jax.tree.leaves(tree_of(nbytes, 0)))
            pull_id = secrets.randbits(63)
            server.await_pull(pull_id, self.arrays)
            specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in self.arrays]
            return address, pull_id, specs

        # ray object store
        def put(self, nbytes: int) -> list[Any]:
            return [ray.put(payload(nbytes))]  # wrapped: the receiver gets the ref, not the value

        # Arrow Flight
        def flight_serve(self, nbytes: int) -> str:
            import pyarrow as pa
            import pyarrow.flight as flight

            table = pa.table({"bytes": pa.array(payload(nbytes))})

            class Server(flight.FlightServerBase):
                def do_get(self, context: Any, ticket: Any) -> Any:
                    return flight.RecordBatchStream(table)

            if self.flight is not None:
                self.flight.shutdown()
            self.flight = Server("grpc://127.0.0.1:0")
            return f"grpc://127.0.0.1:{self.flight.port}"

        # weightwire modes
        def start_mode(self, config: Any) -> None:
            import weightwire as ww

            if self.server is not None:
                self.server.close()
            self.server = ww.create_server(config)
            self.next_id = 0

        def publish(self, nbytes: int) -> int:
            import jax

            self.next_id += 1
            tree = jax.block_until_ready(tree_of(nbytes, self.next_id))
            self.server.serve_weights(self.next_id, tree)
            self.server.flush()
            return tree_crc(tree)

        def close(self) -> None:
            if self.server is not None:
                self.server.close()
            if self.flight is not None:
                self.flight.shutdown()

    @ray.remote(num_cpus=0)
    class Receiver:
        def __init__(self, config: Any) -> None:
            self.config = config
            self.client: Any = None
            self.transfers: dict[int, tuple[Any, str]] = {}  # JAX transfer servers by transport streams
            self.connections: dict[str, Any] = {}
            self.unchecked: Any = None  # the checksum of the last transfer, when not computed yet

        def _result(self, seconds: float, checksum: Any, check: bool) -> tuple[float, int | None]:
            """(seconds, checksum); with check=False the checksum waits for digest(), so a caller
            timing the call times the transfer alone."""
            if check:
                return seconds, checksum()
            self.unchecked = checksum
            return seconds, None

        def digest(self) -> int:
            checksum, self.unchecked = self.unchecked, None
            return checksum()

        def listen_tcp(self, nbytes: int) -> str:
            from weightwire import net

            self.listener = net.bind("127.0.0.1")
            self.tcp_buffer = bytearray(nbytes)  # zero-filled, so its pages are in before the transfer
            return self.listener.address

        def receive_tcp(self, nbytes: int, check: bool = True) -> tuple[float, int | None]:
            buffer = self.tcp_buffer
            view = memoryview(buffer)
            with self.listener.accept(60.0) as conn:
                conn.settimeout(60.0)
                start = time.perf_counter()
                got = 0
                while got < nbytes:
                    n = conn.recv_into(view[got:], nbytes - got)
                    if n == 0:
                        raise ConnectionError(f"sender closed after {got} of {nbytes} bytes")
                    got += n
                seconds = time.perf_counter() - start
            self.listener.close()
            return self._result(seconds, lambda: crc(np.frombuffer(buffer, dtype=np.uint8)), check)

        def pull(self, address: str, pull_id: int, specs: list[Any], transport_streams: int | None = None,
                 check: bool = True) -> tuple[float, int | None]:
            import jax

            server, _ = _transfer_server(self.transfers, self.config, transport_streams)
            specs = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=jax.sharding.SingleDeviceSharding(
                jax.devices()[0])) for s in specs]
            start = time.perf_counter()
            if address not in self.connections:
                self.connections[address] = server.connect(address)
            arrays = jax.block_until_ready(self.connections[address].pull(pull_id, specs))
            seconds = time.perf_counter() - start
            return self._result(seconds, lambda: tree_crc(arrays), check)

        def get(self, wrapped: list[Any]) -> tuple[float, int]:
            start = time.perf_counter()
            data = ray.get(wrapped[0])
            seconds = time.perf_counter() - start
            return seconds, crc(data)

        def flight_get(self, location: str, check: bool = True) -> tuple[float, int | None]:
            import pyarrow.flight as flight

            client = flight.connect(location)
            start = time.perf_counter()
            table = client.do_get(flight.Ticket(b"weights")).read_all()
            seconds = time.perf_counter() - start

            def checksum() -> int:
                column = table.column("bytes").combine_chunks()
                return crc(np.frombuffer(column.buffers()[1], dtype=np.uint8, count=len(column)))

            return self._result(seconds, checksum, check)

        def start_mode(self, config: Any) -> None:
            import weightwire as ww

            if self.client is not None:
                self.client.close()
            self.client = ww.create_client(config)

        def receive(self, check: bool = True) -> tuple[float, int | None]:
            update = self.client.receive_weights(None, wait=True, timeout_s=300)
            return self._result(update.seconds, lambda: tree_crc(update.params), check)

        def close(self) -> None:
            if self.client is not None:
                self.client.close()

    return Sender, Receiver


def _measure(path: str, size_mib: int, repeats: int, once: Any, expected: Any) -> Measurement:
    seconds = []
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        took, checksum = once()
        if checksum != expected():
            raise AssertionError(f"{path} at {size_mib} MiB delivered wrong bytes")
        seconds.append(took)
    return Measurement(path, size_mib, seconds[1:])


def mode_config(mode: str, coordinator_name: str, directory: str) -> Any:
    """The config of a benchmarked mode; "native-tcp" is native with shared memory switched off."""
    import weightwire as ww

    return ww.TransferConfig(mode="native" if mode == "native-tcp" else mode, coordinator_name=coordinator_name,
                             host="127.0.0.1", timeout_s=300.0,
                             checkpoint_dir=directory if mode == "checkpoint" else None,
                             native_shared_memory=mode != "native-tcp")


def jax_pull_path(transport_streams: int) -> str:
    """The name of a raw JAX pull path: one transport stream is the plain call (JAX's defaults need
    at least one between two processes); mode="jax" uses TransferConfig.transport_streams."""
    return f"raw jax pull, {transport_streams} stream{'s' if transport_streams > 1 else ''}"


def _run_size(ray: Any, sender: Any, receiver: Any, size: int, repeats: int, modes: list[str],
              base: Any) -> list[Measurement]:
    """Every path at one size; the closures below run before this returns."""

    results: list[Measurement] = []
    nbytes = size * MiB
    expected_payload = crc(payload(nbytes))

    def memcpy() -> tuple[float, int]:
        src, dst = payload(nbytes), np.empty(nbytes, dtype=np.uint8)
        dst.fill(0)  # fault the pages in first, as a staging buffer would be
        start = time.perf_counter()
        np.copyto(dst, src)
        return time.perf_counter() - start, crc(dst)

    def tcp() -> tuple[float, int]:
        address = ray.get(receiver.listen_tcp.remote(nbytes))
        pending = receiver.receive_tcp.remote(nbytes)
        ray.get(sender.send_tcp.remote(address, nbytes))
        return ray.get(pending)

    def jax_pull(streams: int) -> tuple[float, int]:
        address, pull_id, specs = ray.get(sender.offer_pull.remote(nbytes, streams))
        return ray.get(receiver.pull.remote(address, pull_id, specs, streams))

    def ray_get() -> tuple[float, int]:
        return ray.get(receiver.get.remote(ray.get(sender.put.remote(nbytes))))

    paths = [("numpy memcpy (1 process)", memcpy, lambda: expected_payload),
             (REFERENCE, tcp, lambda: expected_payload),
             *[(jax_pull_path(streams), lambda streams=streams: jax_pull(streams),
                lambda: tree_crc(tree_of(nbytes, 0))) for streams in sorted({1, base.transport_streams})],
             ("ray.put + ray.get", ray_get, lambda: expected_payload)]
    try:
        import pyarrow.flight  # noqa: F401

        location = ray.get(sender.flight_serve.remote(nbytes))
        paths.append(("Arrow Flight do_get", lambda: ray.get(receiver.flight_get.remote(location)),
                      lambda: expected_payload))
    except ImportError:
        print("(Arrow Flight skipped: pip install pyarrow)", file=sys.stderr)
    for path, once, expected in paths:
        results.append(_measure(path, size, repeats, once, expected))
    crcs: list[int] = []  # the digest of each version published, newest last

    def receive_mode() -> tuple[float, int]:
        crcs.append(ray.get(sender.publish.remote(nbytes)))
        return ray.get(receiver.receive.remote())

    for mode in modes:
        with tempfile.TemporaryDirectory(prefix="weightwire-bench-") as directory:
            config = mode_config(mode, f"{base.coordinator_name}-{mode}-{size}", directory)
            ray.get([sender.start_mode.remote(config), receiver.start_mode.remote(config)])
            results.append(_measure(f"weightwire mode={mode}", size, repeats, receive_mode, lambda: crcs[-1]))
            ray.get([receiver.close.remote(), sender.close.remote()])
    return results


def run(sizes_mib: list[int], repeats: int, modes: list[str]) -> list[Measurement]:
    import ray

    import weightwire as ww

    base = ww.TransferConfig(mode="jax", coordinator_name=f"bench-{uuid.uuid4().hex[:8]}", host="127.0.0.1",
                             timeout_s=300.0)
    Sender, Receiver = _actors()
    sender, receiver = Sender.remote(base), Receiver.remote(base)
    results: list[Measurement] = []
    try:
        for size in sizes_mib:
            results.extend(_run_size(ray, sender, receiver, size, repeats, modes, base))
    finally:
        ray.get([receiver.close.remote(), sender.close.remote()], timeout=60)
        ray.kill(sender)
        ray.kill(receiver)
    return results


def render(results: list[Measurement]) -> str:
    reference = {m.size_mib: m.median_gbps for m in results if m.path == REFERENCE}
    lines = [f"{'path':<28} {'size':>9} {'median GB/s':>12} {'min':>7} {'max':>7} {'vs raw TCP':>11}"]
    for m in results:
        d = m.as_dict()
        ratio = m.median_gbps / reference[m.size_mib] if m.size_mib in reference else float("nan")
        lines.append(f"{m.path:<28} {m.size_mib:>5} MiB {m.median_gbps:>12.2f} {d['min_gbps']:>7.2f} "
                     f"{d['max_gbps']:>7.2f} {ratio:>10.2f}x")
    lines.append("Note: on one node, ray.get maps the object store's shared memory (zero-copy) and a CPU\n"
                 "jax.device_put may alias it, so the ray paths move no bytes here: their GB/s is not a\n"
                 "link speed. Between nodes Ray copies over the network.")
    return "\n".join(lines)


def plot(results: list[Measurement], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'weightwire[bench]'") from None
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in dict.fromkeys(m.path for m in results):
        points = [(m.size_mib, m.median_gbps) for m in results if m.path == name]
        ax.plot(*zip(*points, strict=True), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")  # memcpy and zero-copy paths sit orders of magnitude above the links
    ax.set_xlabel("transfer size (MiB)")
    ax.set_ylabel("GB/s (median)")
    ax.set_title("weightwire bench")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args: argparse.Namespace) -> int:
    import ray

    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(
        QUICK_SIZES_MIB if args.quick else FULL_SIZES_MIB)
    repeats = args.repeats or (3 if args.quick else 5)
    modes = args.modes.split(",") if args.modes else list(MODES)
    if args.address:
        ray.init(address=args.address, include_dashboard=False, configure_logging=False)
    else:
        ray.init(num_cpus=4, include_dashboard=False, configure_logging=False, _node_ip_address="127.0.0.1",
                 runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "1"}})
    try:
        results = run(sizes, repeats, modes)
    finally:
        ray.shutdown()
    print(render(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"host": socket.gethostname(), "time": time.time(), "repeats": repeats,
                       "results": [m.as_dict() for m in results]}, f, indent=2)
    if args.plot:
        plot(results, args.plot)
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="16 and 64 MiB, 3 repeats (about a minute)")
    parser.add_argument("--sizes", help="comma-separated sizes in MiB (default 16,64,256,1024)")
    parser.add_argument("--repeats", type=int, default=0, help="measured repeats per path and size")
    parser.add_argument("--modes", help=f"comma-separated weightwire modes (default {','.join(MODES)}; "
                        "native-tcp is native with the shared-memory path off)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--plot", help="also draw GB/s against size into this PNG (needs matplotlib)")
    parser.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
