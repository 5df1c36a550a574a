"""What is particular to mode="jax" (the shared behaviour is in test_modes.py): shard layouts
must match, the coordinator's lifetime, and configuration checks."""

from __future__ import annotations

import time
import uuid
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import weightwire as ww

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture
def config() -> ww.TransferConfig:
    return ww.TransferConfig(mode="jax", coordinator_name=f"test-{uuid.uuid4().hex[:8]}", host="127.0.0.1",
                             timeout_s=20.0)


@pytest.fixture
def mesh() -> Mesh:
    devices = np.array(jax.devices()[:4])
    if devices.size < 2:
        pytest.skip("needs 2+ devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
    return Mesh(devices.reshape(2, -1), ("data", "model"))


def test_a_transposed_sharding_is_a_spec_mismatch(server: Any, client: Any, mesh: Mesh) -> None:
    served = jax.device_put(jnp.arange(16.0).reshape(4, 4), NamedSharding(mesh, PartitionSpec("data", "model")))
    server.serve_weights(1, {"w": served})
    transposed = jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("model", "data")))
    with pytest.raises(ww.SpecMismatchError, match=r"\['w'\].*splits the array differently"):
        client.receive_weights({"w": transposed})
    assert server.metrics().offers == 0  # refused before any pull was even requested


def test_a_mismatch_is_caught_before_the_trainer_is_asked_for_an_offer(server: Any, client: Any) -> None:
    server.serve_weights(1, {"w": jnp.ones((4, 4), jnp.bfloat16)})
    with pytest.raises(ww.SpecMismatchError, match="weight_id 1"):
        client.receive_weights({"w": jnp.ones((4, 4), jnp.float32)})
    assert server.metrics().offers == 0


def test_a_version_announced_but_not_served_fails_fast_instead_of_spinning(server: Any, client: Any) -> None:
    server.serve_weights(1, {"w": jnp.ones(4)})
    with server._lock:
        server._latest = None  # as if the trainer lost it between staging and publishing
    start = time.monotonic()
    with pytest.raises(ww.WeightTransferError, match="no longer serves it"):
        client.receive_weights(None, timeout_s=10)
    with pytest.raises(ww.TransferTimeoutError):
        client.receive_weights(None, wait=True, timeout_s=2)
    assert time.monotonic() - start < 10
    assert server.metrics().refusals <= 2  # asked once per call, not in a loop


def test_close_removes_the_coordinator_after_its_last_user(config: ww.TransferConfig, ray_cluster: Any) -> None:
    server = ww.create_server(config)
    client = ww.create_client(config)
    server.serve_weights(1, {"w": jnp.ones(4)})
    client.receive_weights(None)
    server.close()
    assert config.coordinator_name in {a["name"] for a in ray_cluster.util.list_named_actors(all_namespaces=True)}
    client.close()
    deadline = time.monotonic() + 20
    while config.coordinator_name in {a["name"] for a in ray_cluster.util.list_named_actors(all_namespaces=True)}:
        assert time.monotonic() < deadline, "coordinator still alive after its last user closed"
    server.close()  # closing twice is a no-op
    with pytest.raises(ww.WeightTransferError, match="closed"):
        client.receive_weights(None)


def test_explicit_shutdown_removes_the_coordinator(config: ww.TransferConfig) -> None:
    with ww.create_server(config) as server, ww.create_client(config) as client:
        server.serve_weights(1, {"w": jnp.ones(4)})
        assert ww.shutdown_coordinator(config)
        with pytest.raises(ww.CoordinatorError):
            client.receive_weights(None)
    assert not ww.shutdown_coordinator(config)


def test_config_rejects_unknown_modes_and_bad_values() -> None:
    with pytest.raises(ValueError, match="'jax', 'ray', 'checkpoint', 'native'"):
        ww.TransferConfig(mode="carrier-pigeon")
    with pytest.raises(ValueError, match="timeout_s"):
        ww.TransferConfig(timeout_s=float("nan"))
    with pytest.raises(ValueError, match="max_parallel_copies"):
        ww.TransferConfig(max_parallel_copies=1)  # can wedge the JAX server (DESIGN.md)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        ww.TransferConfig(mode="checkpoint")
    with pytest.raises(TypeError):
        ww.create_server("jax")  # type: ignore[arg-type]
