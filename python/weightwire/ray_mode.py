"""mode="ray": each version is put into the Ray object store once (not once per client), and
clients read it zero-copy and place it on their placeholder's shardings.

The coordinator holds only the latest version's ref, so the object store does not grow with the
number of updates. A version is owned by the trainer process that put it (Ray 2.56 removed the
way to hand ownership over), so whether it outlives that process is Ray's call: on one node with
Ray 2.60 it stayed readable after its trainer was killed. Where Ray has lost it, the client gets a
WeightTransferError saying so, never stale or partial bytes, and picks up the restarted trainer's
new epoch once it publishes.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from weightwire.config import TransferConfig
from weightwire.errors import TransferTimeoutError, WeightTransferError
from weightwire.manifest import Manifest
from weightwire.transfer import BaseClient, BaseServer, remaining

logger = logging.getLogger(__name__)

SOURCE = "ray_remoting"


class Server(BaseServer):
    def __init__(self, config: TransferConfig) -> None:
        super().__init__(config, f"ray object store (coordinator {config.coordinator_name!r})")

    def _snapshot(self, params: Any) -> Any:
        return params  # ray.put below copies the bytes before serve_weights returns

    def _stage(self, manifest: Manifest, leaves: list[Any]) -> Manifest:
        import numpy as np
        import ray

        host = [np.asarray(leaf) for leaf in leaves]  # zero-copy for CPU arrays
        ref = ray.put(host)
        self._metrics.bytes_offered += manifest.nbytes
        return dataclasses.replace(manifest, location=ref)


class Client(BaseClient):
    source = SOURCE

    def _fetch(self, manifest: Manifest, specs: list[Any], deadline: float) -> list[Any] | None:
        import jax
        import ray

        try:
            host = ray.get(manifest.location, timeout=remaining(deadline))
        except ray.exceptions.GetTimeoutError:
            raise TransferTimeoutError(f"weight_id {manifest.weight_id}: the object store did not deliver "
                                       "it before the deadline") from None
        except (ray.exceptions.ObjectLostError, ray.exceptions.OwnerDiedError) as exc:
            raise WeightTransferError(f"weight_id {manifest.weight_id} of epoch {manifest.epoch} is lost: the "
                                      f"trainer process that published it died ({type(exc).__name__})") from None
        return jax.block_until_ready([jax.device_put(h, spec.sharding) for h, spec in zip(host, specs, strict=True)])
