"""Prints, after a measured run, each benchmark's median as a ratio to its group's reference; and the
sender/receiver actors the comparison benchmarks share."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

REFERENCE_MARK = "reference"


def pytest_terminal_summary(terminalreporter: Any, config: Any) -> None:
    session = getattr(config, "_benchmarksession", None)
    benchmarks = [b for b in getattr(session, "benchmarks", []) if not b.has_error and b.stats]
    groups: dict[str, list[Any]] = {}
    for bench in benchmarks:
        groups.setdefault(bench.group or "", []).append(bench)
    for group, members in sorted(groups.items()):
        refs = [b for b in members if REFERENCE_MARK in b.name]
        if not refs:
            continue
        ref = refs[0]
        terminalreporter.write_line(f"[{group}] median ratios to {ref.name} (higher is faster):")
        for bench in members:
            ratio = ref.stats.median / bench.stats.median
            median_ms = bench.stats.median * 1e3
            terminalreporter.write_line(f"    {bench.name:<50} median {median_ms:8.2f} ms   {ratio:5.2f}x")


@pytest.fixture(scope="module")
def bench_actors(ray_cluster: Any) -> Iterator[tuple[Any, Any, Any, Any]]:
    """(ray, sender, receiver, base config): the two processes of `weightwire bench`, as Ray actors."""
    import weightwire as ww
    from weightwire import bench

    config = ww.TransferConfig(mode="jax", coordinator_name=f"bench-{uuid.uuid4().hex[:8]}", host="127.0.0.1",
                               timeout_s=300.0)
    sender_class, receiver_class = bench._actors()
    sender, receiver = sender_class.remote(config), receiver_class.remote(config)
    yield ray_cluster, sender, receiver, config
    ray_cluster.get([sender.close.remote(), receiver.close.remote()], timeout=60)
    for actor in (sender, receiver):
        ray_cluster.kill(actor)
