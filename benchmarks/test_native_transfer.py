"""mode="native" against the raw paths it replaces, at 256 MiB and 1 GiB, between the same two
processes (Ray actors), in the same run; every transfer is checked bit-exact (CRC32C).

Per size, one group with the raw single-stream TCP socket (`sendall` -> `recv_into` into a buffer
allocated in setup) as the reference, raw JAX transfer-server pulls (one transport stream, and
mode="jax"'s count), Arrow Flight `do_get`, native over TCP (shared memory off) and native over
the same-host shared-memory path. Payloads and published versions are made in each round's
untimed setup, and the received bytes are checksummed in its untimed teardown; the timed part is
the Ray call(s) that move the bytes, whose overhead every path shares.

    pytest benchmarks/test_native_transfer.py --benchmark-enable
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from typing import Any

import pytest

from weightwire import bench

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(900)]

SIZES_MIB = [256, 1024]
ROUNDS = {256: 7, 1024: 3}


def run(benchmark: Any, ray: Any, receiver: Any, transfer: Callable[..., Any], setup: Callable[[], Any],
        expected: Callable[[], int], rounds: int) -> None:
    """benchmark.pedantic, checking each round's bytes in its teardown (untimed)."""
    def check(*_: Any) -> None:
        assert ray.get(receiver.digest.remote(), timeout=300) == expected()

    benchmark.pedantic(transfer, setup=setup, teardown=check, rounds=rounds, warmup_rounds=1)
    if benchmark.disabled:  # one plain round then, and pytest-benchmark skips teardown: check it here
        check()


@pytest.mark.parametrize("size_mib", SIZES_MIB)
def test_raw_tcp_reference(benchmark: Any, bench_actors: Any, size_mib: int) -> None:
    ray, sender, receiver, _ = bench_actors
    benchmark.group = f"native-{size_mib}MiB"
    nbytes = size_mib << 20
    expected = bench.crc(bench.payload(nbytes))

    def listen() -> tuple[tuple[str, Any], dict[str, Any]]:
        address = ray.get(receiver.listen_tcp.remote(nbytes), timeout=60)
        return (address, receiver.receive_tcp.remote(nbytes, check=False)), {}

    def send(address: str, pending: Any) -> None:
        ray.get([sender.send_tcp.remote(address, nbytes), pending], timeout=300)

    run(benchmark, ray, receiver, send, listen, lambda: expected, ROUNDS[size_mib])


@pytest.mark.parametrize("size_mib", SIZES_MIB)
@pytest.mark.parametrize("transport_streams", [1, None], ids=["1-stream", "mode-jax-streams"])
def test_raw_jax_transfer_pull(benchmark: Any, bench_actors: Any, size_mib: int, transport_streams: int | None) -> None:
    """One transport stream is the plain call, the reference of issue 5's "3x the raw JAX pull"
    (DESIGN.md's "pull (defaults)": JAX's defaults plus the one transport address two processes
    need). None is what mode="jax" uses (TransferConfig.transport_streams, 2): a stricter bar."""
    ray, sender, receiver, _ = bench_actors
    benchmark.group = f"native-{size_mib}MiB"
    expected = bench.tree_crc(bench.tree_of(size_mib << 20, 0))

    def offer() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return ray.get(sender.offer_pull.remote(size_mib << 20, transport_streams), timeout=300), {}

    def pull(address: str, pull_id: int, specs: Any) -> None:
        ray.get(receiver.pull.remote(address, pull_id, specs, transport_streams, check=False), timeout=300)

    run(benchmark, ray, receiver, pull, offer, lambda: expected, ROUNDS[size_mib])


@pytest.mark.parametrize("size_mib", SIZES_MIB)
def test_arrow_flight_do_get(benchmark: Any, bench_actors: Any, size_mib: int) -> None:
    pytest.importorskip("pyarrow.flight")
    ray, sender, receiver, _ = bench_actors
    benchmark.group = f"native-{size_mib}MiB"
    nbytes = size_mib << 20
    expected = bench.crc(bench.payload(nbytes))
    location = ray.get(sender.flight_serve.remote(nbytes), timeout=300)

    def get() -> None:
        ray.get(receiver.flight_get.remote(location, check=False), timeout=300)

    run(benchmark, ray, receiver, get, lambda: None, lambda: expected, ROUNDS[size_mib])


@pytest.mark.parametrize("size_mib", SIZES_MIB)
@pytest.mark.parametrize("path", ["native-tcp", "native"])
def test_native_mode(benchmark: Any, bench_actors: Any, size_mib: int, path: str) -> None:
    ray, sender, receiver, base = bench_actors
    benchmark.group = f"native-{size_mib}MiB"
    with tempfile.TemporaryDirectory() as unused:
        config = bench.mode_config(path, f"{base.coordinator_name}-{path}-{size_mib}", unused)
    ray.get([sender.start_mode.remote(config), receiver.start_mode.remote(config)], timeout=120)
    published: list[int] = []  # the checksum of each version, newest last

    def publish() -> tuple[tuple[()], dict[str, Any]]:
        published.append(ray.get(sender.publish.remote(size_mib << 20), timeout=300))
        return (), {}

    def receive() -> None:
        ray.get(receiver.receive.remote(check=False), timeout=300)

    run(benchmark, ray, receiver, receive, publish, lambda: published[-1], ROUNDS[size_mib])
    ray.get([receiver.close.remote(), sender.close.remote()], timeout=60)
