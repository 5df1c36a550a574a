"""The two processes of the mode benchmarks: a trainer that publishes through weightwire and
offers the same arrays to the raw reference path, and a rollout that receives both ways."""

from __future__ import annotations

import secrets
from typing import Any

import ray


def make_params(weight_id: int, total_bytes: int, leaves: int) -> dict[str, Any]:
    import jax.numpy as jnp

    per_leaf = total_bytes // leaves // 4
    return {f"layer{i:02d}": jnp.full((per_leaf,), float(weight_id * 100 + i), dtype=jnp.float32)
            for i in range(leaves)}


def digest(params: Any) -> list[float]:
    import jax
    import numpy as np

    return [float(np.asarray(leaf)[0]) + float(np.asarray(leaf)[-1]) for leaf in jax.tree.leaves(params)]


@ray.remote(num_cpus=0)
class BenchTrainer:
    def __init__(self, config: Any, total_bytes: int, leaves: int) -> None:
        import jax

        import weightwire as ww
        from weightwire.jax_mode import _start_transfer_server

        self.server = ww.create_server(config)
        if config.mode.value == "jax":
            self.raw, self.raw_address = _start_transfer_server(config)
        self.total_bytes, self.leaves = total_bytes, leaves
        self.raw_arrays = jax.block_until_ready(jax.tree.leaves(make_params(0, total_bytes, leaves)))

    def publish(self, weight_id: int) -> None:
        import jax

        params = jax.block_until_ready(make_params(weight_id, self.total_bytes, self.leaves))
        self.server.serve_weights(weight_id, params)

    def put_raw(self) -> list[Any]:
        """The same arrays in the object store, as host numpy arrays; the ref comes back wrapped
        in a list so Ray hands over the ref, not its value."""
        import numpy as np

        return [ray.put([np.asarray(a) for a in self.raw_arrays])]

    def offer_raw(self) -> tuple[str, int]:
        pull_id = secrets.randbits(63)
        self.raw.await_pull(pull_id, self.raw_arrays)
        return self.raw_address, pull_id


@ray.remote(num_cpus=0)
class BenchRollout:
    def __init__(self, config: Any, total_bytes: int, leaves: int) -> None:
        import jax

        import weightwire as ww
        from weightwire.jax_mode import _start_transfer_server

        self.client = ww.create_client(config)
        if config.mode.value == "jax":
            self.raw, _ = _start_transfer_server(config)
        self.placeholder = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                                        make_params(0, total_bytes, leaves))
        self.connections: dict[str, Any] = {}

    def receive(self) -> tuple[int, list[float]]:
        update = self.client.receive_weights(self.placeholder, wait=True, timeout_s=120)
        return update.weight_id, digest(update.params)

    def raw_get(self, wrapped: list[Any]) -> list[float]:
        """What a user would do without weightwire: ray.get, then device_put onto the same
        shardings."""
        import jax

        host = ray.get(wrapped[0])
        specs = jax.tree.leaves(self.placeholder)
        return digest(jax.block_until_ready([jax.device_put(h, s.sharding) for h, s in zip(host, specs, strict=True)]))

    def raw_pull(self, address: str, pull_id: int) -> list[float]:
        import jax

        if address not in self.connections:  # connect once, as the client does
            self.connections[address] = self.raw.connect(address)
        arrays = jax.block_until_ready(self.connections[address].pull(pull_id, jax.tree.leaves(self.placeholder)))
        return digest(arrays)
