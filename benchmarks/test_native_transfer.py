"""mode="native" against the raw paths it replaces, at 256 MiB and 1 GiB, between the same two
processes (Ray actors), in the same run; every transfer is checked bit-exact (CRC32C).

Per size, one group with the raw single-stream TCP socket (`sendall` -> `recv_into` into a buffer
allocated in setup) as the reference, the raw JAX transfer-server pull, Arrow Flight `do_get`,
native over TCP (shared memory off) and native over the same-host shared-memory path. Payloads
and published versions are made in each round's untimed setup; the timed part is the Ray call(s)
that move and check the bytes, whose overhead every path shares.

    pytest benchmarks/test_native_transfer.py --benchmark-enable
"""

from __future__ import annotations

import tempfile
from typing import Any

import pytest

from weightwire import bench

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(900)]

SIZES_MIB = [256, 1024]
ROUNDS = {256: 7, 1024: 3}


@pytest.mark.parametrize("size_mib", SIZES_MIB)
def test_raw_tcp_reference(benchmark: Any, bench_actors: Any, size_mib: int) -> None:
    ray, sender, receiver, _ = bench_actors
    benchmark.group = f"native-{size_mib}MiB"
    nbytes = size_mib << 20
    expected = bench.crc(bench.payload(nbytes))

    def listen() -> tuple[tuple[str, Any], dict[str, Any]]:
        address = ray.get(receiver.listen_tcp.remote(nbytes), timeout=60)
        return (address, receiver.receive_tcp.remote(nbytes)), {}

    def send(address: str, pending: Any) -> None:
        ray.get(sender.send_tcp.remote(address, nbytes), timeout=300)
        assert ray.get(pending, timeout=300)[1] == expected

    benchmark.pedantic(send, setup=listen, rounds=ROUNDS[size_mib], warmup_rounds=1)


@pytest.mark.parametrize("size_mib", SIZES_MIB)
def test_raw_jax_transfer_pull(benchmark: Any, bench_actors: Any, size_mib: int) -> None:
    ray, sender, receiver, _ = bench_actors
    benchmark.group = f"native-{size_mib}MiB"
    expected = bench.tree_crc(bench.tree_of(size_mib << 20, 0))

    def offer() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return ray.get(sender.offer_pull.remote(size_mib << 20), timeout=300), {}

    def pull(address: str, pull_id: int, specs: Any) -> None:
        assert ray.get(receiver.pull.remote(address, pull_id, specs), timeout=300)[1] == expected

    benchmark.pedantic(pull, setup=offer, rounds=ROUNDS[size_mib], warmup_rounds=1)


@pytest.mark.parametrize("size_mib", SIZES_MIB)
def test_arrow_flight_do_get(benchmark: Any, bench_actors: Any, size_mib: int) -> None:
    pytest.importorskip("pyarrow.flight")
    ray, sender, receiver, _ = bench_actors
    benchmark.group = f"native-{size_mib}MiB"
    nbytes = size_mib << 20
    expected = bench.crc(bench.payload(nbytes))
    location = ray.get(sender.flight_serve.remote(nbytes), timeout=300)

    def get() -> None:
        assert ray.get(receiver.flight_get.remote(location), timeout=300)[1] == expected

    benchmark.pedantic(get, rounds=ROUNDS[size_mib], warmup_rounds=1)


@pytest.mark.parametrize("size_mib", SIZES_MIB)
@pytest.mark.parametrize("path", ["native-tcp", "native"])
def test_native_mode(benchmark: Any, bench_actors: Any, size_mib: int, path: str) -> None:
    ray, sender, receiver, base = bench_actors
    benchmark.group = f"native-{size_mib}MiB"
    with tempfile.TemporaryDirectory() as unused:
        config = bench.mode_config(path, f"{base.coordinator_name}-{path}-{size_mib}", unused)
    ray.get([sender.start_mode.remote(config), receiver.start_mode.remote(config)], timeout=120)

    def publish() -> tuple[tuple[int], dict[str, Any]]:
        return (ray.get(sender.publish.remote(size_mib << 20), timeout=300),), {}

    def receive(expected: int) -> None:
        assert ray.get(receiver.receive.remote(), timeout=300)[1] == expected

    benchmark.pedantic(receive, setup=publish, rounds=ROUNDS[size_mib], warmup_rounds=1)
    ray.get([receiver.close.remote(), sender.close.remote()], timeout=60)
