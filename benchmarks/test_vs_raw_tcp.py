"""The `weightwire bench` comparison as a pytest-benchmark group: each mode and the raw references
against a raw single-stream TCP socket, 64 MiB, the same two processes, the same run, every
transfer checked bit-exact. (`python -m weightwire bench` runs the full size sweep.)

    pytest benchmarks/test_vs_raw_tcp.py --benchmark-enable
"""

from __future__ import annotations

from typing import Any

import pytest

import weightwire as ww
from weightwire import bench

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(600)]

SIZE_MIB = 64
NBYTES = SIZE_MIB << 20
GROUP = f"vs-raw-tcp-{SIZE_MIB}MiB"


def test_raw_tcp_reference(benchmark: Any, bench_actors: Any) -> None:
    ray, sender, receiver, _ = bench_actors
    benchmark.group = GROUP
    expected = bench.crc(bench.payload(NBYTES))

    def listen() -> tuple[tuple[str, Any], dict[str, Any]]:
        address = ray.get(receiver.listen_tcp.remote(NBYTES), timeout=60)
        return (address, receiver.receive_tcp.remote(NBYTES)), {}

    def send(address: str, pending: Any) -> None:
        ray.get(sender.send_tcp.remote(address, NBYTES), timeout=120)
        assert ray.get(pending, timeout=120)[1] == expected

    benchmark.pedantic(send, setup=listen, rounds=7, warmup_rounds=1)


def test_raw_jax_transfer_pull(benchmark: Any, bench_actors: Any) -> None:
    ray, sender, receiver, _ = bench_actors
    benchmark.group = GROUP
    expected = bench.tree_crc(bench.tree_of(NBYTES, 0))

    def offer() -> tuple[tuple[Any, ...], dict[str, Any]]:
        return ray.get(sender.offer_pull.remote(NBYTES), timeout=120), {}

    def pull(address: str, pull_id: int, specs: Any) -> None:
        assert ray.get(receiver.pull.remote(address, pull_id, specs), timeout=120)[1] == expected

    benchmark.pedantic(pull, setup=offer, rounds=7, warmup_rounds=1)


@pytest.mark.parametrize("mode", ["jax", "checkpoint"])
def test_weightwire_mode(benchmark: Any, bench_actors: Any, mode: str, tmp_path: Any) -> None:
    ray, sender, receiver, base = bench_actors
    benchmark.group = GROUP
    config = ww.TransferConfig(mode=mode, coordinator_name=f"{base.coordinator_name}-{mode}", host="127.0.0.1",
                               timeout_s=120.0, checkpoint_dir=str(tmp_path) if mode == "checkpoint" else None)
    ray.get([sender.start_mode.remote(config), receiver.start_mode.remote(config)], timeout=120)

    def publish() -> tuple[tuple[int], dict[str, Any]]:
        return (ray.get(sender.publish.remote(NBYTES), timeout=120),), {}

    def receive(expected: int) -> None:
        assert ray.get(receiver.receive.remote(), timeout=120)[1] == expected

    benchmark.pedantic(receive, setup=publish, rounds=7, warmup_rounds=1)
    ray.get([receiver.close.remote(), sender.close.remote()], timeout=60)
