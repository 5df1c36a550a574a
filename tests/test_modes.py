"""The shared suite: the original framework's tests, and the API's guarantees, in every mode.
A trainer switches transport by changing one config field, and gets the same behaviour."""

from __future__ import annotations

import gc
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import weightwire as ww

pytestmark = pytest.mark.usefixtures("ray_cluster")

# "native-tcp" is mode="native" with the same-host shared-memory path switched off.
MODES = ["jax", "ray", "checkpoint", "native", "native-tcp"]
SOURCES = {"jax": "jax_transfer_server", "ray": "ray_remoting", "checkpoint": "gcs_checkpoint", "native": "native"}


@pytest.fixture(params=MODES)
def config(request: pytest.FixtureRequest, tmp_path: Path) -> ww.TransferConfig:
    mode, extra = request.param, {}
    if mode == "checkpoint":
        (tmp_path / "ckpt").mkdir()
        extra["checkpoint_dir"] = str(tmp_path / "ckpt")
    if mode == "native-tcp":
        mode, extra["native_shared_memory"] = "native", False
    return ww.TransferConfig(mode=mode, coordinator_name=f"modes-{uuid.uuid4().hex[:8]}",
                             host="127.0.0.1", timeout_s=30.0, **extra)


def publish(server: Any, weight_id: int, params: Any) -> None:
    """serve_weights, then wait until the version is visible (checkpoint mode writes in the
    background)."""
    assert server.serve_weights(weight_id, params)
    server.flush(30.0)


def make_params(seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "embed": jnp.asarray(rng.standard_normal((64, 32)), dtype=jnp.bfloat16),
        "layers": [{"w": jnp.asarray(rng.standard_normal((32, 32)), dtype=jnp.float32),
                    "b": jnp.arange(32, dtype=jnp.int32) + seed} for _ in range(2)],
        "mask": jnp.asarray(rng.integers(0, 2, 16), dtype=jnp.bool_),
    }


def assert_bit_exact(got: Any, expected: Any) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert isinstance(g, jax.Array)
        assert g.dtype == e.dtype and g.shape == e.shape
        assert np.asarray(g).tobytes() == np.asarray(e).tobytes()


def test_basic_weight_transfer(config: ww.TransferConfig, server: Any, client: Any) -> None:
    params = make_params(1)
    publish(server, 1, params)
    update = client.receive_weights(params)
    assert update is not None
    assert update.weight_id == 1 and update.source == SOURCES[config.mode.value]
    assert update.nbytes == sum(leaf.nbytes for leaf in jax.tree.leaves(params))
    assert_bit_exact(update.params, params)


def test_multiple_weight_updates(server: Any, client: Any) -> None:
    for weight_id in range(1, 5):
        params = make_params(weight_id)
        publish(server, weight_id, params)
        update = client.receive_weights(params)
        assert update is not None and update.weight_id == weight_id
        assert_bit_exact(update.params, params)
    metrics = client.metrics()
    assert metrics.transfers == 4 and metrics.last_weight_id == 4 and metrics.versions_skipped == 0
    assert metrics.gbps > 0 and server.metrics().versions_published == 4


def test_client_no_new_weights(server: Any, client: Any) -> None:
    params = make_params(1)
    start = time.monotonic()
    assert client.receive_weights(params) is None  # nothing published yet
    publish(server, 1, params)
    assert client.receive_weights(params) is not None
    assert client.receive_weights(params) is None  # nothing newer
    assert time.monotonic() - start < 10.0


def test_late_client_gets_the_latest_and_counts_what_it_skipped(server: Any, client: Any) -> None:
    publish(server, 1, make_params(1))
    assert client.receive_weights(None).weight_id == 1
    for weight_id in (2, 3, 4):
        publish(server, weight_id, make_params(weight_id))
    update = client.receive_weights(None)
    assert update.weight_id == 4 and update.versions_skipped == 2
    assert_bit_exact(update.params, make_params(4))


def test_a_lagging_announcement_is_never_returned(server: Any, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The announcement a client starts fetching may lag a publish that already returned: the
    coordinator, asked in parallel, names the newer version, and that one is returned."""
    publish(server, 1, make_params(1))
    lagging = client._coordinator.call("latest")  # keeps version 1 readable in ray mode
    publish(server, 2, make_params(2))
    monkeypatch.setattr(client._announcements, "newest", lambda: lagging)
    fetched = []
    real_fetch = client._fetch
    monkeypatch.setattr(client, "_fetch", lambda m, *a: fetched.append(m.weight_id) or real_fetch(m, *a))
    update = client.receive_weights(None)
    assert fetched[0] == 1 and update.weight_id == 2  # it did start on the lagging one
    assert_bit_exact(update.params, make_params(2))


def test_concurrent_clients(config: ww.TransferConfig, server: Any) -> None:
    params = make_params(7)
    publish(server, 7, params)
    results: list[Any] = [None] * 3
    clients = [ww.create_client(config) for _ in results]
    try:
        threads = [threading.Thread(target=lambda i=i, c=c: results.__setitem__(i, c.receive_weights(params)))
                   for i, c in enumerate(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for c in clients:
            c.close()
    for result in results:
        assert result is not None and result.weight_id == 7
        assert_bit_exact(result.params, params)


def test_placeholder_none(server: Any, client: Any) -> None:
    params = make_params(2)
    publish(server, 2, params)
    assert_bit_exact(client.receive_weights(None).params, params)


def test_jax_numpy_conversion(server: Any, client: Any) -> None:
    # numpy leaves in, jax.Array leaves out, every dtype kept exactly.
    sent = {"bf16": np.arange(8, dtype=ml_dtypes.bfloat16), "f32": np.linspace(0, 1, 5, dtype=np.float32),
            "i8": np.array([-128, 0, 127], dtype=np.int8), "u32": np.array([2**32 - 1], dtype=np.uint32),
            "scalar": np.float32(3.5)}
    publish(server, 1, sent)
    update = client.receive_weights(None)
    for name, value in sent.items():
        got = update.params[name]
        assert isinstance(got, jax.Array) and got.dtype == np.asarray(value).dtype
        assert np.asarray(got).tobytes() == np.asarray(value).tobytes()


def test_empty_params(server: Any, client: Any) -> None:
    publish(server, 1, {})
    update = client.receive_weights(None)
    assert update.params == {} and update.nbytes == 0 and update.weight_id == 1


def test_none_leaves_are_tree_structure(server: Any, client: Any) -> None:
    params = {"w": jnp.ones(3), "unused": None}
    publish(server, 1, params)
    update = client.receive_weights(params)
    assert update.params["unused"] is None
    assert_bit_exact(update.params, params)


@pytest.mark.parametrize("leaf", [object(), "text", np.array([object()]), [1, 2]])
def test_bad_leaves_are_rejected_naming_the_leaf(server: Any, leaf: Any) -> None:
    with pytest.raises(TypeError, match=r"\['bad'\]"):
        server.serve_weights(1, {"bad": leaf, "ok": jnp.ones(2)})
    publish(server, 1, {"ok": jnp.ones(2)})  # the rejected call claimed no id


def test_spec_mismatch_raises_before_any_byte_moves(server: Any, client: Any) -> None:
    publish(server, 1, {"w": jnp.ones((4, 4), jnp.bfloat16)})
    for placeholder, match in [({"w": jnp.ones((4, 4), jnp.float32)}, "dtype float32, offered bfloat16"),
                               ({"w": jnp.ones((4, 5), jnp.bfloat16)}, r"shape \(4, 5\)"),
                               ({"x": jnp.ones((4, 4), jnp.bfloat16)}, "tree differs")]:
        with pytest.raises(ww.SpecMismatchError, match=match):
            client.receive_weights(placeholder)
    assert client.metrics().transfers == 0


def test_a_placeholder_that_matched_before_is_checked_again_when_anything_changes(server: Any, client: Any) -> None:
    """The check is remembered across versions of one run, but not past a change on either side."""
    good = {"w": jnp.ones((4, 4), jnp.bfloat16)}
    publish(server, 1, good)
    assert client.receive_weights(good).weight_id == 1
    publish(server, 2, good)
    with pytest.raises(ww.SpecMismatchError, match="dtype float32"):
        client.receive_weights({"w": jnp.ones((4, 4), jnp.float32)})
    assert client.receive_weights(good).weight_id == 2
    publish(server, 3, {"w": jnp.ones((4, 5), jnp.bfloat16)})  # the trainer's side changes
    with pytest.raises(ww.SpecMismatchError, match=r"shape \(4, 4\), offered \(4, 5\)"):
        client.receive_weights(good)


def test_served_arrays_stay_valid_after_the_trainer_deletes_its_copy(server: Any, client: Any) -> None:
    params = make_params(5)
    expected = jax.tree.map(np.array, params)
    assert server.serve_weights(5, params)
    for leaf in jax.tree.leaves(params):
        leaf.delete()
    server.flush(30.0)
    update = client.receive_weights(None)
    for got, want in zip(jax.tree.leaves(update.params), jax.tree.leaves(expected), strict=True):
        assert np.asarray(got).tobytes() == want.tobytes()


def test_older_ids_are_ignored_within_an_epoch(server: Any, client: Any) -> None:
    publish(server, 5, make_params(5))
    assert not server.serve_weights(4, make_params(4))
    assert not server.serve_weights(5, make_params(6))
    assert client.receive_weights(None).weight_id == 5
    assert server.metrics().versions_ignored == 2


def test_a_restarted_trainer_starts_a_new_epoch_that_clients_accept(config: ww.TransferConfig) -> None:
    first = ww.create_server(config)
    with ww.create_client(config) as client:
        publish(first, 100, make_params(100))
        assert client.receive_weights(None).weight_id == 100
        first.close()
        with ww.create_server(config) as restarted:
            publish(restarted, 1, make_params(1))  # lower than what the client holds
            update = client.receive_weights(None)
            assert update is not None and update.weight_id == 1 and update.epoch == restarted.epoch
            assert_bit_exact(update.params, make_params(1))


def test_wait_blocks_until_a_newer_version_arrives(server: Any, client: Any) -> None:
    publisher = threading.Timer(0.3, server.serve_weights, args=(1, make_params(1)))
    publisher.start()
    update = client.receive_weights(None, wait=True, timeout_s=30)
    publisher.join()
    assert update.weight_id == 1


def test_wait_past_its_deadline_raises_a_typed_timeout(server: Any, client: Any) -> None:
    start = time.monotonic()
    with pytest.raises(ww.TransferTimeoutError) as info:
        client.receive_weights(None, wait=True, timeout_s=1.0)
    assert isinstance(info.value, TimeoutError)
    assert time.monotonic() - start < 1.0 + 2.0
    assert client.metrics().timeouts == 1


def test_with_mesh_sharding(config: ww.TransferConfig, server: Any) -> None:
    devices = np.array(jax.devices()[:4])
    if devices.size < 2:
        pytest.skip("needs 2+ devices (XLA_FLAGS=--xla_force_host_platform_device_count)")
    mesh = Mesh(devices.reshape(2, -1), ("data", "model"))
    shardings = {"w": NamedSharding(mesh, PartitionSpec("data", "model")),
                 "b": NamedSharding(mesh, PartitionSpec("data"))}
    params = {"w": jax.device_put(jnp.arange(64 * 32, dtype=jnp.float32).reshape(64, 32), shardings["w"]),
              "b": jax.device_put(jnp.arange(64, dtype=jnp.float32), shardings["b"])}
    publish(server, 1, params)
    with ww.create_client(config, shardings=shardings) as client:
        update = client.receive_weights(None)
    assert update.params["w"].sharding == shardings["w"]
    assert update.params["b"].sharding == shardings["b"]
    assert_bit_exact(update.params, params)


def shared_segments() -> int:
    """Shared staging segments this process has open (memfds: nothing is ever left in /dev/shm)."""
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if "weightwire-staging" in _readlink(fd))


def _readlink(path: Path) -> str:
    try:
        return str(path.readlink())
    except OSError:  # closed between listing and reading
        return ""


def test_cleanup(config: ww.TransferConfig, ray_cluster: Any, tmp_path: Path) -> None:
    """After close: no listening port, no thread, no coordinator actor, no temp file is left."""
    from weightwire import net

    threads_before = {t.ident for t in threading.enumerate()}
    temp_before = set(Path("/tmp").glob("tmp*.safetensors"))
    server, client = ww.create_server(config), ww.create_client(config)
    publish(server, 1, make_params(1))
    update = client.receive_weights(None)
    ports = [x.address for x in (server, client) if config.mode.value in ("jax", "native") and hasattr(x, "address")]
    if config.mode.value == "native":
        assert shared_segments() == 1  # the served version
    client.close()
    server.close()
    del update
    gc.collect()
    for address in ports:
        with pytest.raises(ConnectionRefusedError):
            net.probe(address, 5.0)
    assert {t.ident for t in threading.enumerate()} <= threads_before
    assert set(Path("/tmp").glob("tmp*.safetensors")) <= temp_before
    assert shared_segments() == 0
    deadline = time.monotonic() + 20
    while config.coordinator_name in {a["name"] for a in ray_cluster.util.list_named_actors(all_namespaces=True)}:
        assert time.monotonic() < deadline, "the coordinator outlived its last user"
