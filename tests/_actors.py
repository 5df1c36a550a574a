"""Ray actors for the multi-process tests: a trainer process and rollout processes. Weights are a
pure function of (weight_id, size), so every process can check what it received bit for bit."""

from __future__ import annotations

from typing import Any

import ray


def make_params(weight_id: int, size: int) -> dict[str, Any]:
    import jax.numpy as jnp

    return {"w": jnp.arange(size, dtype=jnp.float32) + weight_id,
            "b": jnp.full((16,), weight_id, dtype=jnp.bfloat16)}


def matches(params: Any, weight_id: int, size: int) -> bool:
    import jax
    import numpy as np

    expected = make_params(weight_id, size)
    return all(np.asarray(g).tobytes() == np.asarray(e).tobytes()
               for g, e in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True))


def resources() -> dict[str, int]:
    """This process's resident memory, open file descriptors and OS threads (native ones too)."""
    import os

    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    return {"rss_mib": rss_pages * os.sysconf("SC_PAGE_SIZE") >> 20, "fds": len(os.listdir("/proc/self/fd")),
            "threads": len(os.listdir("/proc/self/task"))}


@ray.remote(num_cpus=0)
class Trainer:
    def __init__(self, config: Any) -> None:
        import weightwire as ww

        self.server = ww.create_server(config)

    def serve(self, weight_id: int, size: int) -> bool:
        return self.server.serve_weights(weight_id, make_params(weight_id, size))

    def epoch(self) -> str:
        return self.server.epoch

    def resources(self) -> dict[str, int]:
        return resources()

    def flush(self) -> None:
        self.server.flush(60.0)

    def set_faults(self, **faults: int) -> None:
        """mode="native" only: make the server misbehave on purpose (native_mode.SendFaults)."""
        from weightwire.native_mode import SendFaults

        self.server.faults = SendFaults(**faults)

    def wait_sending(self, timeout_s: float) -> bool:
        """mode="native" only: whether a stream is being sent, waiting up to timeout_s for one."""
        return self.server.wait_sending(lambda n: n > 0, timeout_s)

    def close(self) -> None:
        self.server.close()


@ray.remote(num_cpus=0)
class Rollout:
    def __init__(self, config: Any) -> None:
        import weightwire as ww

        self.client = ww.create_client(config)

    def client_id(self) -> str:
        return self.client.client_id

    def resources(self) -> dict[str, int]:
        return resources()

    def receive(self, size: int, *, wait: bool, timeout_s: float) -> tuple[int, bool] | None:
        """(weight_id, bit-exact?) of what arrived, or None; errors come back as (type, message)."""
        update = self.client.receive_weights(None, wait=wait, timeout_s=timeout_s)
        if update is None:
            return None
        return update.weight_id, matches(update.params, update.weight_id, size)

    def receive_or_error(self, size: int, timeout_s: float) -> tuple[str, str, float, Any]:
        """(error class, message, seconds, receive() result) of one receive with wait=True."""
        import time

        start = time.monotonic()
        try:
            result = self.receive(size, wait=True, timeout_s=timeout_s)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            return type(exc).__name__, str(exc), time.monotonic() - start, None
        return "", "", time.monotonic() - start, result

    def error_classes(self, name: str) -> list[str]:
        import weightwire as ww

        return [c.__name__ for c in getattr(ww, name).__mro__]

    def close(self) -> None:
        self.client.close()
