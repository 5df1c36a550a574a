"""mode="jax" in one process: a server and clients in the test driver, the coordinator a Ray actor.
The multi-process and failure cases are in test_jax_multiprocess.py."""

from __future__ import annotations

import gc
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import weightwire as ww
from weightwire import net

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture
def config() -> ww.TransferConfig:
    return ww.TransferConfig(mode="jax", coordinator_name=f"test-{uuid.uuid4().hex[:8]}", host="127.0.0.1",
                             timeout_s=20.0)


@pytest.fixture
def server(config: ww.TransferConfig) -> Iterator[Any]:
    with ww.create_server(config) as s:
        yield s


@pytest.fixture
def client(config: ww.TransferConfig, server: Any) -> Iterator[Any]:
    with ww.create_client(config) as c:
        yield c


def make_params(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "embed": jnp.asarray(rng.standard_normal((64, 32)), dtype=jnp.bfloat16),
        "layers": [{"w": jnp.asarray(rng.standard_normal((32, 32)), dtype=jnp.float32),
                    "b": jnp.arange(32, dtype=jnp.int32) + seed} for _ in range(2)],
        "step": jnp.asarray(seed, dtype=jnp.int64 if jax.config.jax_enable_x64 else jnp.int32),
    }


def assert_bit_exact(got: Any, expected: Any) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert isinstance(g, jax.Array)
        assert g.dtype == e.dtype and g.shape == e.shape
        assert np.asarray(g).tobytes() == np.asarray(e).tobytes()


def test_basic_weight_transfer(server: Any, client: Any) -> None:
    params = make_params(1)
    assert server.serve_weights(1, params)
    update = client.receive_weights(params)
    assert update is not None
    assert update.weight_id == 1 and update.source == "jax_transfer_server"
    assert update.nbytes == sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    assert_bit_exact(update.params, params)


def test_multiple_weight_updates(server: Any, client: Any) -> None:
    for weight_id in range(1, 5):
        params = make_params(weight_id)
        server.serve_weights(weight_id, params)
        update = client.receive_weights(params)
        assert update is not None and update.weight_id == weight_id
        assert_bit_exact(update.params, params)
    metrics = client.metrics()
    assert metrics.transfers == 4 and metrics.last_weight_id == 4 and metrics.versions_skipped == 0
    assert server.metrics().offers == 4


def test_client_no_new_weights_returns_none_at_once(server: Any, client: Any) -> None:
    params = make_params(1)
    start = time.monotonic()
    assert client.receive_weights(params) is None  # nothing published yet
    server.serve_weights(1, params)
    assert client.receive_weights(params) is not None
    assert client.receive_weights(params) is None  # nothing newer
    assert time.monotonic() - start < 5.0


def test_late_client_gets_the_latest_and_counts_what_it_skipped(server: Any, client: Any) -> None:
    params = make_params(3)
    server.serve_weights(1, params)
    assert client.receive_weights(params).weight_id == 1
    for weight_id in (2, 3, 4):
        server.serve_weights(weight_id, make_params(weight_id))
    update = client.receive_weights(params)
    assert update.weight_id == 4 and update.versions_skipped == 2
    assert_bit_exact(update.params, make_params(4))


def test_concurrent_clients_get_identical_weights(config: ww.TransferConfig, server: Any) -> None:
    params = make_params(7)
    server.serve_weights(7, params)
    results: list[Any] = [None, None]
    with ww.create_client(config) as a, ww.create_client(config) as b:
        threads = [threading.Thread(target=lambda i=i, c=c: results.__setitem__(i, c.receive_weights(params)))
                   for i, c in enumerate((a, b))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert all(r is not None and r.weight_id == 7 for r in results)
    assert_bit_exact(results[0].params, params)
    assert_bit_exact(results[1].params, params)


def test_placeholder_none_builds_it_from_the_manifest(server: Any, client: Any) -> None:
    params = make_params(2)
    server.serve_weights(2, params)
    update = client.receive_weights(None)
    assert_bit_exact(update.params, params)


def test_empty_params_round_trip(server: Any, client: Any) -> None:
    server.serve_weights(1, {})
    update = client.receive_weights(None)
    assert update.params == {} and update.nbytes == 0


def test_none_leaves_are_structure(server: Any, client: Any) -> None:
    params = {"w": jnp.ones(3), "unused": None}
    server.serve_weights(1, params)
    update = client.receive_weights(params)
    assert update.params["unused"] is None
    assert_bit_exact(update.params, params)


@pytest.mark.parametrize("leaf", [object(), "text", np.array([object()])])
def test_non_array_leaves_are_rejected_naming_the_leaf(server: Any, leaf: Any) -> None:
    with pytest.raises(TypeError, match=r"\['bad'\]"):
        server.serve_weights(1, {"bad": leaf, "ok": jnp.ones(2)})


@pytest.mark.parametrize(("placeholder", "match"), [
    ({"w": jnp.ones((4, 4), jnp.float32)}, "dtype float32, offered bfloat16"),
    ({"w": jnp.ones((4, 5), jnp.bfloat16)}, r"shape \(4, 5\)"),
    ({"x": jnp.ones((4, 4), jnp.bfloat16)}, "tree differs"),
    ([jnp.ones((4, 4), jnp.bfloat16)], "tree differs"),
])
def test_spec_mismatch_raises_before_any_byte_moves(server: Any, client: Any, placeholder: Any, match: str) -> None:
    server.serve_weights(1, {"w": jnp.ones((4, 4), jnp.bfloat16)})
    with pytest.raises(ww.SpecMismatchError, match=match) as info:
        client.receive_weights(placeholder)
    assert "weight_id 1" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert server.metrics().offers == 0  # nothing was requested, let alone pulled


def test_served_arrays_stay_valid_after_the_trainer_deletes_its_copy(server: Any, client: Any) -> None:
    params = make_params(5)
    expected = jax.tree.map(np.asarray, params)
    server.serve_weights(5, params)
    for leaf in jax.tree.leaves(params):
        leaf.delete()
    update = client.receive_weights(None)
    for got, want in zip(jax.tree.leaves(update.params), jax.tree.leaves(expected), strict=True):
        assert np.asarray(got).tobytes() == want.tobytes()


def test_older_ids_are_ignored_within_an_epoch(server: Any, client: Any) -> None:
    assert server.serve_weights(5, make_params(5))
    assert not server.serve_weights(4, make_params(4))
    assert not server.serve_weights(5, make_params(6))
    assert client.receive_weights(None).weight_id == 5
    assert server.metrics().versions_ignored == 2


def test_a_restarted_trainer_starts_a_new_epoch_that_clients_accept(config: ww.TransferConfig) -> None:
    first = ww.create_server(config)
    with ww.create_client(config) as client:
        first.serve_weights(100, make_params(100))
        assert client.receive_weights(None).weight_id == 100
        first.close()
        with ww.create_server(config) as restarted:
            assert restarted.epoch != first.epoch
            restarted.serve_weights(1, make_params(1))  # lower than what the client holds
            update = client.receive_weights(None)
            assert update is not None and update.weight_id == 1 and update.epoch == restarted.epoch
            assert_bit_exact(update.params, make_params(1))


def test_wait_blocks_until_a_newer_version_arrives(server: Any, client: Any) -> None:
    params = make_params(1)
    publisher = threading.Timer(0.3, server.serve_weights, args=(1, params))
    publisher.start()
    update = client.receive_weights(params, wait=True, timeout_s=20)
    publisher.join()
    assert update.weight_id == 1


def test_wait_past_its_deadline_raises_a_typed_timeout(server: Any, client: Any) -> None:
    start = time.monotonic()
    with pytest.raises(ww.TransferTimeoutError) as info:
        client.receive_weights(None, wait=True, timeout_s=1.0)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - start < 1.0 + 2.0
    assert client.metrics().timeouts == 1


@pytest.fixture
def mesh() -> Mesh:
    devices = np.array(jax.devices()[:4])
    if devices.size < 2:
        pytest.skip("needs 2+ devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
    return Mesh(devices.reshape(2, -1), ("data", "model"))


def test_with_mesh_sharding(config: ww.TransferConfig, server: Any, mesh: Mesh) -> None:
    sharding = NamedSharding(mesh, PartitionSpec("data", "model"))
    params = {"w": jax.device_put(jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32), sharding),
              "b": jax.device_put(jnp.arange(64, dtype=jnp.float32), NamedSharding(mesh, PartitionSpec("data")))}
    server.serve_weights(1, params)
    shardings = {"w": sharding, "b": NamedSharding(mesh, PartitionSpec("data"))}
    with ww.create_client(config, shardings=shardings) as client:
        update = client.receive_weights(None)
    assert update.params["w"].sharding == sharding
    assert update.params["b"].sharding == shardings["b"]
    assert_bit_exact(update.params, params)


def test_a_transposed_sharding_is_a_spec_mismatch(server: Any, client: Any, mesh: Mesh) -> None:
    served = jax.device_put(jnp.arange(16.0).reshape(4, 4), NamedSharding(mesh, PartitionSpec("data", "model")))
    server.serve_weights(1, {"w": served})
    transposed = jax.ShapeDtypeStruct((4, 4), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec("model", "data")))
    with pytest.raises(ww.SpecMismatchError, match=r"\['w'\].*splits the array differently"):
        client.receive_weights({"w": transposed})


def test_close_removes_the_coordinator_after_its_last_user(config: ww.TransferConfig, ray_cluster: Any) -> None:
    server = ww.create_server(config)
    client = ww.create_client(config)
    server.serve_weights(1, make_params(1))
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


def test_config_rejects_unknown_modes_and_bad_values() -> None:
    with pytest.raises(ValueError, match="'jax', 'ray', 'checkpoint', 'native'"):
        ww.TransferConfig(mode="carrier-pigeon")
    with pytest.raises(ValueError, match="timeout_s"):
        ww.TransferConfig(timeout_s=float("nan"))
    with pytest.raises(ValueError, match="max_parallel_copies"):
        ww.TransferConfig(max_parallel_copies=1)  # can wedge the JAX server (DESIGN.md)
    with pytest.raises(TypeError):
        ww.create_server("jax")  # type: ignore[arg-type]


def test_cleanup_releases_ports_and_threads(config: ww.TransferConfig) -> None:
    threads_before = {t.ident for t in threading.enumerate()}
    server, client = ww.create_server(config), ww.create_client(config)
    server.serve_weights(1, make_params(1))
    client.receive_weights(None)
    addresses = [server.address, client.address]
    assert all(net.probe(a, 5.0) > 0 for a in addresses)
    client.close()
    server.close()
    gc.collect()
    for address in addresses:
        with pytest.raises(ConnectionRefusedError):
            net.probe(address, 5.0)
    assert {t.ident for t in threading.enumerate()} <= threads_before  # (the coordinator: test above)


def test_explicit_shutdown_removes_the_coordinator(config: ww.TransferConfig) -> None:
    with ww.create_server(config) as server, ww.create_client(config) as client:
        server.serve_weights(1, make_params(1))
        assert ww.shutdown_coordinator(config)
        with pytest.raises(ww.CoordinatorError):
            client.receive_weights(None)
    assert not ww.shutdown_coordinator(config)
