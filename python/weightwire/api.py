"""The public API every mode implements: create_server / create_client, WeightUpdate, metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from weightwire.config import TransferConfig, TransferMode


@dataclass(frozen=True)
class WeightUpdate:
    params: Any
    weight_id: int
    nbytes: int
    seconds: float  # from finding this version to having its arrays ready (waiting excluded)
    source: str  # "jax_transfer_server", "ray_remoting", "gcs_checkpoint" or "native"
    epoch: str  # the trainer run that published it; a restarted trainer has a new one
    versions_skipped: int  # newer versions published since the last one this client received


@dataclass
class ClientMetrics:
    transfers: int = 0
    bytes: int = 0
    seconds: float = 0.0
    failures: int = 0
    timeouts: int = 0
    last_weight_id: int | None = None
    versions_skipped: int = 0  # staleness: published versions this client never received

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass
class ServerMetrics:
    versions_published: int = 0
    versions_ignored: int = 0  # serve_weights with an id not above the current one
    offers: int = 0  # pulls offered to clients
    refusals: int = 0  # requests for a version already superseded
    bytes_offered: int = 0
    last_weight_id: int | None = None


def _mode_classes(mode: TransferMode) -> tuple[Any, Any]:
    """(server class, client class) of a mode, imported only when asked for."""
    if mode is TransferMode.JAX:
        from weightwire import jax_mode as module
    elif mode is TransferMode.RAY:
        from weightwire import ray_mode as module  # type: ignore[no-redef]
    elif mode is TransferMode.CHECKPOINT:
        from weightwire import checkpoint_mode as module  # type: ignore[no-redef]
    else:
        from weightwire import native_mode as module  # type: ignore[no-redef]
    return module.Server, module.Client


def create_server(config: TransferConfig) -> Any:
    """The trainer side of `config.mode`. Close it (or use it as a context manager) when done."""
    if not isinstance(config, TransferConfig):
        raise TypeError(f"config must be a TransferConfig, got {type(config).__name__}")
    server_class, _ = _mode_classes(TransferMode(config.mode))
    return server_class(config)


def shutdown_coordinator(config: TransferConfig) -> bool:
    """Removes the coordinator named by `config`, whoever still uses it; False if there was none.
    Servers and clients still attached fail with CoordinatorError on their next call."""
    from weightwire._ray import ensure_ray

    if not isinstance(config, TransferConfig):
        raise TypeError(f"config must be a TransferConfig, got {type(config).__name__}")
    ray = ensure_ray(config)
    try:
        actor = ray.get_actor(config.coordinator_name, namespace=config.ray_namespace)
    except ValueError:
        return False
    ray.kill(actor)
    return True


def create_client(config: TransferConfig, *, shardings: Any = None) -> Any:
    """The rollout side of `config.mode`. `shardings` places weights received without a
    placeholder: one jax Sharding for all leaves, or a tree of them (default: the first device)."""
    if not isinstance(config, TransferConfig):
        raise TypeError(f"config must be a TransferConfig, got {type(config).__name__}")
    _, client_class = _mode_classes(TransferMode(config.mode))
    return client_class(config, shardings=shardings)
