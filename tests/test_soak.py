"""Soak: 200 consecutive updates to 3 clients in the modes that hold connections and threads of
their own (native over shared memory and over TCP, jax). Each process's resident memory, open
descriptors and OS threads must stay flat after warm-up (the growth is printed), every version
must arrive exact, and nothing may be left in /dev/shm or /tmp afterwards."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from _actors import Rollout, Trainer

import weightwire as ww

pytestmark = [pytest.mark.usefixtures("ray_cluster"), pytest.mark.timeout(600)]

UPDATES = 200
WARM_UP = 20  # buffers, pools and connections settle in during these
SIZE = 256 << 10  # float32 elements per version: 1 MiB
# Bounded growth over the 180 measured updates: a leak of one buffer, descriptor or thread per
# update would blow through these many times over.
MAX_RSS_GROWTH_MIB = 48
MAX_FD_GROWTH = 4
MAX_THREAD_GROWTH = 4


def temp_files() -> set[str]:
    return set(os.listdir("/dev/shm")) | {p.name for p in Path("/tmp").glob("tmp*.safetensors")}


@pytest.mark.parametrize("mode", ["native", "native-tcp", "jax"])
def test_two_hundred_updates_to_three_clients_leave_resources_flat(ray_cluster: Any, mode: str) -> None:
    config = ww.TransferConfig(mode=mode.removesuffix("-tcp"), coordinator_name=f"soak-{uuid.uuid4().hex[:8]}",
                               host="127.0.0.1", timeout_s=60.0, native_shared_memory=mode == "native")
    leftovers_before = temp_files()
    trainer, rollouts = Trainer.remote(config), [Rollout.remote(config) for _ in range(3)]
    processes = [trainer, *rollouts]
    try:
        baseline: list[dict[str, int]] = []
        for weight_id in range(1, UPDATES + 1):
            assert ray_cluster.get(trainer.serve.remote(weight_id, SIZE), timeout=60)
            got = ray_cluster.get([r.receive.remote(SIZE, wait=True, timeout_s=60) for r in rollouts], timeout=120)
            assert got == [(weight_id, True)] * 3, f"update {weight_id}: {got}"
            if weight_id == WARM_UP:
                baseline = ray_cluster.get([p.resources.remote() for p in processes], timeout=30)
        final = ray_cluster.get([p.resources.remote() for p in processes], timeout=30)
        for name, before, after in zip(["trainer", "client 1", "client 2", "client 3"], baseline, final, strict=True):
            growth = {key: after[key] - before[key] for key in before}
            print(f"{mode} {name}: after {WARM_UP} updates {before}, after {UPDATES} {after}, growth {growth}")
            assert growth["rss_mib"] <= MAX_RSS_GROWTH_MIB, f"{name}: {growth}"
            assert growth["fds"] <= MAX_FD_GROWTH, f"{name}: {growth}"
            assert growth["threads"] <= MAX_THREAD_GROWTH, f"{name}: {growth}"
        ray_cluster.get([p.close.remote() for p in processes], timeout=60)
    finally:
        for actor in processes:
            ray_cluster.kill(actor)
    assert temp_files() <= leftovers_before
