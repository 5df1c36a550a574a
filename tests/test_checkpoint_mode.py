"""What is particular to mode="checkpoint": atomic publication, integrity, pruning, fsspec URLs,
and clear errors for bad directories."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
import pytest

import weightwire as ww
from weightwire.checkpoint_mode import COMMIT_MARKER, MANIFEST_FILE, WEIGHTS_FILE, committed_versions

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _config(directory: str, **overrides: Any) -> ww.TransferConfig:
    return ww.TransferConfig(mode="checkpoint", checkpoint_dir=directory,
                             coordinator_name=f"ckpt-{uuid.uuid4().hex[:8]}", timeout_s=30.0, **overrides)


@pytest.fixture
def config(tmp_path: Path) -> ww.TransferConfig:
    return _config(str(tmp_path), max_checkpoints=2)


@pytest.fixture
def pair(config: ww.TransferConfig) -> Iterator[tuple[Any, Any]]:
    with ww.create_server(config) as server, ww.create_client(config) as client:
        yield server, client


def params_for(weight_id: int) -> dict[str, Any]:
    return {"w": jnp.full((256,), weight_id, dtype=jnp.float32), "b": jnp.full((8,), weight_id, dtype=jnp.bfloat16)}


def _only_version_dir(config: ww.TransferConfig) -> Path:
    (directory,) = committed_versions(config.checkpoint_dir or "")
    return Path(directory)


def test_a_version_directory_holds_only_pickle_free_files(pair: tuple[Any, Any], config: ww.TransferConfig) -> None:
    server, _ = pair
    server.serve_weights(1, params_for(1))
    server.flush()
    assert {p.name for p in _only_version_dir(config).iterdir()} == {WEIGHTS_FILE, MANIFEST_FILE, COMMIT_MARKER}


def test_a_corrupted_byte_raises_integrity_error_never_weights(pair: tuple[Any, Any],
                                                               config: ww.TransferConfig) -> None:
    server, client = pair
    server.serve_weights(1, params_for(1))
    server.flush()
    weights = _only_version_dir(config) / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01  # inside the last tensor's bytes
    weights.write_bytes(bytes(data))
    with pytest.raises(ww.IntegrityError, match=r"weight_id 1, leaf \['[wb]'\]: checksum mismatch"):
        client.receive_weights(None)


def test_a_truncated_file_raises_integrity_error(pair: tuple[Any, Any], config: ww.TransferConfig) -> None:
    server, client = pair
    server.serve_weights(1, params_for(1))
    server.flush()
    weights = _only_version_dir(config) / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ww.IntegrityError, match="damaged"):
        client.receive_weights(None)


def test_only_the_newest_max_checkpoints_are_kept(pair: tuple[Any, Any], config: ww.TransferConfig) -> None:
    server, client = pair
    for weight_id in range(1, 6):
        server.serve_weights(weight_id, params_for(weight_id))
        server.flush()
    kept = committed_versions(config.checkpoint_dir or "")
    assert len(kept) == 2 and kept[-1].endswith("-w5") and kept[0].endswith("-w4")
    assert client.receive_weights(None).weight_id == 5


def test_a_trainer_running_ahead_drops_unwritten_versions_for_the_newest(pair: tuple[Any, Any]) -> None:
    server, client = pair
    for weight_id in range(1, 21):
        server.serve_weights(weight_id, params_for(weight_id))
    server.flush()
    assert server.metrics().last_weight_id == 20
    update = client.receive_weights(None)
    assert update.weight_id == 20 and np.asarray(update.params["w"])[0] == 20


def test_a_reader_racing_a_writer_never_gets_a_partial_checkpoint(pair: tuple[Any, Any]) -> None:
    server, client = pair

    def write() -> None:
        for weight_id in range(1, 41):
            server.serve_weights(weight_id, params_for(weight_id))
        server.flush()

    writer = threading.Thread(target=write)
    writer.start()
    received = []
    # Until the last version, not until the writer is done: a client can hold version 40 before
    # the writer's flush returns, and would then wait in vain for a newer one.
    while not received or received[-1] != 40:
        update = client.receive_weights(None, wait=True, timeout_s=30)
        for leaf in update.params.values():  # every leaf exactly of the version it claims
            assert (np.asarray(leaf) == update.weight_id).all()
        received.append(update.weight_id)
    writer.join(30)
    assert received == sorted(set(received)) and received[-1] == 40


def test_fsspec_memory_urls_work(ray_cluster: Any) -> None:
    import fsspec

    url = f"memory://weightwire-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("memory").makedirs(url, exist_ok=True)
    config = _config(url)
    with ww.create_server(config) as server, ww.create_client(config) as client:
        server.serve_weights(3, params_for(3))
        server.flush()
        update = client.receive_weights(None)
    assert update.weight_id == 3 and update.source == "gcs_checkpoint"
    assert np.asarray(update.params["b"]).tobytes() == np.asarray(params_for(3)["b"]).tobytes()


def test_a_missing_directory_is_an_error_at_create_server(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        ww.create_server(_config(missing))
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ww.create_server(_config(str(a_file)))


def test_an_unwritable_directory_is_an_error_at_create_server() -> None:
    # /proc refuses new files even to root, which chmod-based tests cannot arrange.
    with pytest.raises(PermissionError, match="not writable"):
        ww.create_server(_config("/proc"))


def test_a_deleted_newest_version_is_an_error_not_a_hang(pair: tuple[Any, Any], config: ww.TransferConfig) -> None:
    import shutil

    server, client = pair
    server.serve_weights(1, params_for(1))
    server.flush()
    shutil.rmtree(_only_version_dir(config))
    with pytest.raises(ww.WeightTransferError, match="missing"):
        client.receive_weights(None, timeout_s=10)


def test_a_failed_write_is_reported_by_flush(pair: tuple[Any, Any], config: ww.TransferConfig,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    server, client = pair

    def broken_write(manifest: Any, leaves: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(server, "_write", broken_write)
    server.serve_weights(1, params_for(1))
    with pytest.raises(ww.WeightTransferError, match="No space left"):
        server.flush()
    assert client.receive_weights(None) is None  # nothing half-written was published
