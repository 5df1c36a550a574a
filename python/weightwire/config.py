"""TransferConfig and TransferMode: what a server and its clients must agree on."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from weightwire._checks import int_arg, seconds_arg


class TransferMode(str, enum.Enum):
    JAX = "jax"  # JAX transfer server, device to device
    RAY = "ray"  # Ray object store
    CHECKPOINT = "checkpoint"  # files under checkpoint_dir
    NATIVE = "native"  # weightwire's own transport


@dataclass(frozen=True, kw_only=True)
class TransferConfig:
    """Settings shared by create_server and create_client; both sides must use equal values.

    coordinator_name names the Ray actor that pairs a trainer with its rollout workers: one per
    job. timeout_s bounds every wait a call makes (a pull, a coordinator call). ray_address joins
    an existing Ray cluster ("auto" or "host:port"); None uses the cluster this process is already
    connected to, or starts a local one.
    """

    mode: TransferMode | str = TransferMode.JAX
    coordinator_name: str = "weightwire"
    ray_namespace: str = "weightwire"
    ray_address: str | None = None
    timeout_s: float = 120.0
    host: str | None = None  # interface the server binds; None: net.local_address()
    # JAX transfer server settings: must be equal on every side (DESIGN.md, JAX facts).
    transport_streams: int = 2
    transfer_size: int = 256 << 20
    max_parallel_copies: int = 8
    # mode="checkpoint": a local path or any fsspec URL (memory://, gs://, s3://, ...).
    checkpoint_dir: str | None = None
    max_checkpoints: int = 3
    # mode="native": TCP streams per transfer (the client's choice), bytes per frame (the
    # server's), and whether a client on the server's host reads through shared memory instead
    # of TCP (False forces TCP).
    native_streams: int = 2
    native_chunk_bytes: int = 4 << 20
    native_shared_memory: bool = True

    def __post_init__(self) -> None:
        try:
            mode = TransferMode(self.mode)
        except ValueError:
            valid = ", ".join(repr(m.value) for m in TransferMode)
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {valid}") from None
        object.__setattr__(self, "mode", mode)
        if not isinstance(self.coordinator_name, str) or not self.coordinator_name:
            raise ValueError(f"coordinator_name must be a non-empty str, got {self.coordinator_name!r}")
        object.__setattr__(self, "timeout_s", seconds_arg(self.timeout_s, "timeout_s"))
        if self.timeout_s == 0:
            raise ValueError("timeout_s must be > 0")
        int_arg(self.transport_streams, "transport_streams", minimum=1, maximum=64)
        int_arg(self.transfer_size, "transfer_size", minimum=1 << 10)
        int_arg(self.max_parallel_copies, "max_parallel_copies", minimum=2)
        int_arg(self.max_checkpoints, "max_checkpoints", minimum=1)
        int_arg(self.native_streams, "native_streams", minimum=1, maximum=64)
        int_arg(self.native_chunk_bytes, "native_chunk_bytes", minimum=4096, maximum=1 << 30)
        if not isinstance(self.native_shared_memory, bool):
            raise TypeError(f"native_shared_memory must be a bool, got {self.native_shared_memory!r}")
        if self.mode is TransferMode.CHECKPOINT and not self.checkpoint_dir:
            raise ValueError("mode='checkpoint' needs checkpoint_dir (a local path or an fsspec URL)")
