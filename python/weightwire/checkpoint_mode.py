"""mode="checkpoint": each version is written under checkpoint_dir (a local path or any fsspec
URL) as safetensors, a pickle-free format: reading a checkpoint never executes code.

A version directory is published only once complete: its files are written, then a COMMITTED
marker last, then the coordinator is told. Clients fetch the version the coordinator names and
verify every leaf's CRC32C before returning it: a corrupted or truncated file raises
IntegrityError, never weights. Writing happens on a background thread, newest first: when the
trainer runs ahead, versions not yet written are dropped for the newest. The last
max_checkpoints versions are kept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from weightwire import _native
from weightwire.config import TransferConfig
from weightwire.errors import CoordinatorError, IntegrityError, TransferTimeoutError, WeightTransferError
from weightwire.manifest import Manifest
from weightwire.transfer import BaseClient, BaseServer, remaining

logger = logging.getLogger(__name__)

SOURCE = "gcs_checkpoint"
WEIGHTS_FILE = "weights.safetensors"
MANIFEST_FILE = "manifest.json"
COMMIT_MARKER = "COMMITTED"
# <sequence>-<epoch prefix>-w<weight_id>: the sequence (ns since the epoch) orders versions
# across trainer restarts, whatever their ids.
_VERSION_DIR = re.compile(r"^(\d{20})-([0-9a-f]{8})-w(\d+)$")


@dataclass(frozen=True)
class CheckpointLocation:
    url: str  # the version's directory
    checksums: tuple[int, ...]  # CRC32C of each leaf's bytes, in leaf order


def _leaf_key(index: int) -> str:
    return f"leaf{index:06d}"


def _filesystem(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)


def _is_local(fs: Any) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(fs, LocalFileSystem)


def committed_versions(checkpoint_dir: str) -> list[str]:
    """Directories of complete versions under checkpoint_dir, oldest first."""
    fs, root = _filesystem(checkpoint_dir)
    names = sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(root, detail=False))
    return [f"{root.rstrip('/')}/{n}" for n in names
            if _VERSION_DIR.match(n) and fs.exists(f"{root.rstrip('/')}/{n}/{COMMIT_MARKER}")]


class Server(BaseServer):
    def __init__(self, config: TransferConfig) -> None:
        assert config.checkpoint_dir is not None  # TransferConfig enforces it for this mode
        self._fs, self._root = _filesystem(config.checkpoint_dir)
        self._check_writable(config.checkpoint_dir)
        super().__init__(config, config.checkpoint_dir)
        self._pending: tuple[Manifest, list[Any]] | None = None
        self._writing = False
        # The last failed write, reported by flush(): (weight_id, what went wrong).
        self._write_error: tuple[int, Exception] | None = None
        self._wake = threading.Condition()
        self._writer = threading.Thread(target=self._write_loop, name=f"weightwire-ckpt-{self.epoch[:8]}",
                                        daemon=True)
        self._writer.start()

    def _check_writable(self, url: str) -> None:
        """A missing or unwritable directory fails here, at create_server, not at the first write."""
        if not self._fs.isdir(self._root):
            raise FileNotFoundError(f"checkpoint_dir {url!r} does not exist (or is not a directory)")
        probe = f"{self._root.rstrip('/')}/.weightwire-probe-{time.time_ns()}"
        try:
            self._fs.pipe(probe, b"")
            self._fs.rm(probe)
        except OSError as exc:
            raise PermissionError(f"checkpoint_dir {url!r} is not writable: {exc}") from None

    def _snapshot(self, params: Any) -> Any:
        import jax

        # Host copies: written later, by the writer thread, whatever the trainer does meanwhile.
        return jax.tree.map(lambda leaf: np.array(leaf, copy=True), params)

    def _stage_and_publish(self, manifest: Manifest, leaves: list[Any]) -> bool:
        with self._wake:
            if self._pending is not None:
                logger.info("checkpoint of weight_id %d dropped: %d is newer", self._pending[0].weight_id,
                            manifest.weight_id)
            self._pending = (manifest, leaves)
            self._wake.notify_all()
        return True

    def _write_loop(self) -> None:
        while True:
            with self._wake:
                while self._pending is None and not self._closed:
                    self._wake.wait()
                if self._pending is None:
                    return
                manifest, leaves = self._pending
                self._pending, self._writing = None, True
            try:
                self._publish(self._write(manifest, leaves))
                self._prune()
                self._write_error = None
            except Exception as exc:  # noqa: BLE001 - a failed write must not stop later ones
                logger.exception("writing checkpoint of weight_id %d under %s failed", manifest.weight_id,
                                 self._config.checkpoint_dir)
                self._write_error = (manifest.weight_id, exc)
            finally:
                with self._wake:
                    self._writing = False
                    self._wake.notify_all()

    def _write(self, manifest: Manifest, leaves: list[Any]) -> Manifest:
        import safetensors.numpy

        name = f"{time.time_ns():020d}-{manifest.epoch[:8]}-w{manifest.weight_id}"
        directory = f"{self._root.rstrip('/')}/{name}"
        tensors = {_leaf_key(i): np.require(leaf, requirements="C") for i, leaf in enumerate(leaves)}
        checksums = tuple(_native.crc32c(t.reshape(-1).view(np.uint8)) for t in tensors.values())
        self._fs.makedirs(directory, exist_ok=True)
        if _is_local(self._fs):
            safetensors.numpy.save_file(tensors, f"{directory}/{WEIGHTS_FILE}")  # no in-memory copy
        else:
            self._fs.pipe(f"{directory}/{WEIGHTS_FILE}", safetensors.numpy.save(tensors))
        description = {
            "weight_id": manifest.weight_id, "epoch": manifest.epoch,
            "leaves": [{"key": _leaf_key(i), "path": spec.path, "shape": list(spec.shape), "dtype": spec.dtype,
                        "crc32c": checksum}
                       for i, (spec, checksum) in enumerate(zip(manifest.leaves, checksums, strict=True))],
        }
        self._fs.pipe(f"{directory}/{MANIFEST_FILE}", json.dumps(description, indent=1).encode())
        self._fs.pipe(f"{directory}/{COMMIT_MARKER}", b"")  # last: the version is now complete
        self._metrics.bytes_offered += manifest.nbytes
        url = self._fs.unstrip_protocol(directory)  # with its protocol: "/x" means a local path
        return dataclasses.replace(manifest, location=CheckpointLocation(url, checksums))

    def _prune(self) -> None:
        """Keeps the newest max_checkpoints complete versions; older ones (and abandoned partial
        writes older than them) are removed."""
        names = sorted(n for n in (p.rstrip("/").rsplit("/", 1)[-1] for p in self._fs.ls(self._root, detail=False))
                       if _VERSION_DIR.match(n))
        committed = [n for n in names if self._fs.exists(f"{self._root.rstrip('/')}/{n}/{COMMIT_MARKER}")]
        keep = set(committed[-self._config.max_checkpoints:])
        oldest_kept = min(keep) if keep else ""
        for name in names:
            if name not in keep and name < oldest_kept:
                self._fs.rm(f"{self._root.rstrip('/')}/{name}", recursive=True)

    def flush(self, timeout_s: float | None = None) -> None:
        """Waits until every version served so far is written and published; raises
        WeightTransferError if the newest write failed."""
        timeout = self._config.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._pending is not None or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TransferTimeoutError(f"checkpoint writes under {self._config.checkpoint_dir} did not "
                                               f"finish within {timeout:g} s")
                self._wake.wait(left)
            if self._write_error is not None:
                weight_id, exc = self._write_error
                # A dead coordinator keeps its own error class, so callers can tell it from a disk problem.
                error = CoordinatorError if isinstance(exc, CoordinatorError) else WeightTransferError
                raise error(f"writing the checkpoint of weight_id {weight_id} under {self._config.checkpoint_dir} "
                            f"failed: {type(exc).__name__}: {exc}")

    def _shutdown(self) -> None:
        with self._wake:
            self._pending = None  # not yet written: dropped, as a newer version would have done
            self._wake.notify_all()
        self._writer.join(self._config.timeout_s)


class Client(BaseClient):
    source = SOURCE

    def _fetch(self, manifest: Manifest, specs: list[Any], deadline: float) -> list[Any] | None:
        import jax

        location: CheckpointLocation = manifest.location
        try:
            host = self._read(location, manifest)
        except IntegrityError:
            raise
        except FileNotFoundError:
            latest = self._coordinator.call("latest", timeout_s=remaining(deadline))
            if latest is not None and (latest.epoch, latest.weight_id) != (manifest.epoch, manifest.weight_id):
                return None  # pruned because newer versions exist: take the newest
            raise WeightTransferError(f"weight_id {manifest.weight_id}: {location.url} is missing, and it is "
                                      "still the newest version") from None
        except OSError as exc:  # permissions, a remote store's errors, ...
            raise WeightTransferError(f"weight_id {manifest.weight_id}: reading {location.url} failed: "
                                      f"{exc}") from None
        remaining(deadline)
        return jax.block_until_ready([jax.device_put(h, spec.sharding) for h, spec in zip(host, specs, strict=True)])

    def _read(self, location: CheckpointLocation, manifest: Manifest) -> list[np.ndarray]:
        from safetensors import safe_open

        fs, path = _filesystem(f"{location.url}/{WEIGHTS_FILE}")
        # safetensors reads only local files (its in-memory numpy loader lacks bf16): copy others.
        with tempfile.NamedTemporaryFile(suffix=".safetensors") as local:
            if _is_local(fs):
                source = path
            else:
                fs.get_file(path, local.name)
                source = local.name
            try:
                with safe_open(source, framework="numpy") as f:
                    tensors = [f.get_tensor(_leaf_key(i)) for i in range(len(manifest.leaves))]
            except FileNotFoundError:
                raise
            except Exception as exc:  # noqa: BLE001 - any parse failure is a damaged file
                raise IntegrityError(f"weight_id {manifest.weight_id}: {location.url}/{WEIGHTS_FILE} is "
                                     f"damaged: {exc}") from None
        for tensor, spec, expected in zip(tensors, manifest.leaves, location.checksums, strict=True):
            if tuple(tensor.shape) != spec.shape or str(tensor.dtype) != spec.dtype:
                raise IntegrityError(
                    f"weight_id {manifest.weight_id}, leaf {spec.path}: the file holds {tensor.dtype}"
                    f"{list(tensor.shape)}, the manifest says {spec.dtype}{list(spec.shape)}")
            if _native.crc32c(np.require(tensor, requirements="C").reshape(-1).view(np.uint8)) != expected:
                raise IntegrityError(f"weight_id {manifest.weight_id}, leaf {spec.path}: checksum mismatch in "
                                     f"{location.url}/{WEIGHTS_FILE}")
        return tensors
