"""`python -m weightwire demo`: the main job. A trainer actor updates a transformer-shaped pytree
for K steps; rollout actors poll and receive every version through the chosen mode; each received
version is checked against the trainer's digest; a table per mode sums it up.

Exit status: 0 if every received version was exact and no rollout failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from weightwire import _native

logger = logging.getLogger(__name__)

ALL_MODES = ("jax", "ray", "checkpoint", "native")
# Measured with this demo on one CPU node: native (shared memory) took a median 0.053 s per
# version, ray 0.138 s. Between GPU hosts, mode="jax" moves device memory directly.
FASTEST_MODE = "native"


def transformer_params(total_bytes: int, layers: int, seed: int = 0) -> dict[str, Any]:
    """An embedding and `layers` blocks of attention and MLP weights (bf16) with float32 norms,
    sized so the whole tree is about `total_bytes`."""
    import jax
    import jax.numpy as jnp

    vocab = 32_000
    # bytes = 2 * d * (vocab + 12 * layers * d): solve the quadratic for the model width d.
    a, b, c = 24 * layers, 2 * vocab, -total_bytes
    d = max(64, int((-b + (b * b - 4 * a * c) ** 0.5) / (2 * a)) // 64 * 64)
    key = jax.random.PRNGKey(seed)

    def normal(shape: tuple[int, ...], i: int) -> jax.Array:
        return (jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32) * 0.02).astype(jnp.bfloat16)

    blocks = []
    for layer in range(layers):
        base = 10 * (layer + 1)
        blocks.append({
            "attention": {name: normal((d, d), base + j) for j, name in enumerate(("wq", "wk", "wv", "wo"))},
            "mlp": {"w_in": normal((d, 4 * d), base + 4), "w_out": normal((4 * d, d), base + 5)},
            "norm": jnp.ones((d,), jnp.float32),
        })
    return {"embedding": normal((vocab, d), 1), "layers": blocks, "final_norm": jnp.ones((d,), jnp.float32)}


def digest(params: Any) -> int:
    """CRC32C over every leaf's bytes, in tree order: equal digests, equal weights."""
    import jax

    crc = 0
    for leaf in jax.tree.leaves(params):
        crc = _native.crc32c(np.ascontiguousarray(np.asarray(leaf)).reshape(-1).view(np.uint8), crc)
    return crc


def _actor_classes() -> tuple[Any, Any]:
    import ray

    @ray.remote(num_cpus=0)
    class Trainer:
        def __init__(self, config: Any, total_bytes: int, layers: int) -> None:
            import jax

            import weightwire as ww

            self.server = ww.create_server(config)
            self.params = jax.block_until_ready(transformer_params(total_bytes, layers))

        def nbytes(self) -> int:
            import jax

            return sum(leaf.nbytes for leaf in jax.tree.leaves(self.params))

        def step(self, weight_id: int, step_seconds: float) -> int:
            """One 'training step': new weights, published; returns their digest."""
            import jax

            time.sleep(step_seconds)  # stands in for the forward/backward pass
            self.params = jax.block_until_ready(jax.tree.map(lambda x: x + x.dtype.type(0.001), self.params))
            self.server.serve_weights(weight_id, self.params)
            self.server.flush()
            return digest(self.params)

        def close(self) -> None:
            self.server.close()

    @ray.remote(num_cpus=0)
    class Rollout:
        def __init__(self, config: Any) -> None:
            import weightwire as ww

            self.client = ww.create_client(config)
            self.params: Any = None

        def poll(self, timeout_s: float) -> dict[str, Any] | None:
            """One poll, as a rollout worker does between generations."""
            try:
                update = self.client.receive_weights(self.params, wait=True, timeout_s=timeout_s)
            except Exception as exc:  # noqa: BLE001 - reported in the table, not fatal to the demo
                return {"error": f"{type(exc).__name__}: {exc}"}
            self.params = update.params
            return {"weight_id": update.weight_id, "digest": digest(update.params), "seconds": update.seconds,
                    "nbytes": update.nbytes, "skipped": update.versions_skipped}

        def close(self) -> None:
            self.client.close()

    return Trainer, Rollout


@dataclass
class ModeResult:
    mode: str
    nbytes: int = 0
    published: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)
    wrong: int = 0
    failures: list[str] = field(default_factory=list)

    def ok(self) -> bool:
        return self.wrong == 0 and not self.failures and bool(self.received)


def run_mode(ray: Any, mode: str, args: argparse.Namespace, progress: Any) -> ModeResult:
    import weightwire as ww

    Trainer, Rollout = _actor_classes()
    result = ModeResult(mode)
    with tempfile.TemporaryDirectory(prefix="weightwire-demo-") as checkpoint_dir:
        config = ww.TransferConfig(mode=mode, coordinator_name=f"demo-{mode}-{time.time_ns()}",
                                   timeout_s=args.timeout, host=args.host,
                                   checkpoint_dir=checkpoint_dir if mode == "checkpoint" else None)
        trainer = Trainer.remote(config, args.size << 20, args.layers)
        rollouts = [Rollout.remote(config) for _ in range(args.rollouts)]
        try:
            result.nbytes = ray.get(trainer.nbytes.remote(), timeout=args.timeout)
            task = progress.add_task(f"{mode:<10}", total=args.steps)
            digests: dict[int, int] = {}
            polls = {r: r.poll.remote(args.timeout) for r in rollouts}
            for weight_id in range(1, args.steps + 1):
                digests[weight_id] = ray.get(trainer.step.remote(weight_id, args.step_seconds), timeout=args.timeout)
                result.published += 1
                progress.update(task, advance=1)
                _collect(ray, polls, digests, result, final=False, timeout=args.timeout)
            _collect(ray, polls, digests, result, final=True, timeout=args.timeout, last=args.steps)
        finally:
            try:
                ray.get([r.close.remote() for r in rollouts] + [trainer.close.remote()], timeout=args.timeout)
            except Exception as exc:  # noqa: BLE001 - the actors are killed below either way
                logger.warning("closing the %s demo actors: %s", mode, exc)
            for actor in (trainer, *rollouts):
                ray.kill(actor)
    return result


def _collect(ray: Any, polls: dict[Any, Any], digests: dict[int, int], result: ModeResult, *, final: bool,
             timeout: float, last: int = 0) -> None:
    """Records the polls that finished; re-arms each rollout's poll until it holds `last`."""
    for rollout, ref in list(polls.items()):
        ready, _ = ray.wait([ref], timeout=timeout if final else 0)
        if not ready:
            continue
        outcome = ray.get(ref)
        if "error" in outcome:
            result.failures.append(outcome["error"])
            del polls[rollout]
            continue
        result.received.append(outcome)
        if outcome["digest"] != digests.get(outcome["weight_id"]):
            result.wrong += 1
        if final and outcome["weight_id"] >= last:
            del polls[rollout]
        else:
            polls[rollout] = rollout.poll.remote(timeout)
    if final and polls:
        _collect(ray, polls, digests, result, final=True, timeout=timeout, last=last)


def _table(results: list[ModeResult]) -> Any:
    from rich.table import Table

    table = Table(title="weightwire demo: what the rollouts received")
    # staleness: versions published but skipped before each receive, on average
    for column in ("mode", "received", "bytes", "median s", "p95 s", "GB/s", "stale", "wrong", "failed"):
        table.add_column(column, justify="right" if column != "mode" else "left")
    for r in results:
        seconds = sorted(x["seconds"] for x in r.received) or [float("nan")]
        p95 = seconds[min(len(seconds) - 1, int(0.95 * len(seconds)))]
        total = sum(x["nbytes"] for x in r.received)
        staleness = statistics.mean(x["skipped"] for x in r.received) if r.received else float("nan")
        table.add_row(r.mode, str(len(r.received)), f"{total / 1e9:.2f} GB", f"{statistics.median(seconds):.3f}",
                      f"{p95:.3f}", f"{total / sum(seconds) / 1e9:.2f}" if r.received else "-",
                      f"{staleness:.2f}", str(r.wrong), str(len(r.failures)))
    return table


def main(args: argparse.Namespace) -> int:
    import ray
    from rich.console import Console
    from rich.progress import Progress

    console = Console(width=None if sys.stdout.isatty() else 110)
    modes = ALL_MODES if args.mode == "all" else (args.mode or FASTEST_MODE,)
    quiet_workers = {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "1"}}  # no XLA info lines from every actor
    if args.address:
        ray.init(address=args.address, include_dashboard=False, configure_logging=False, runtime_env=quiet_workers)
    else:  # the embedded default: a local cluster that lives as long as this command
        ray.init(num_cpus=max(4, args.rollouts + 2), include_dashboard=False, configure_logging=False,
                 _node_ip_address=args.host or "127.0.0.1", runtime_env=quiet_workers)
    results = []
    try:
        with Progress(console=console) as progress:
            for mode in modes:
                results.append(run_mode(ray, mode, args, progress))
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: shutting everything down")
        return 130
    finally:
        ray.shutdown()  # stops the embedded cluster's processes and frees its shared memory
    console.print(_table(results))
    for r in results:
        for failure in r.failures[:3]:
            console.print(f"[red]{r.mode}: {failure}")
    bad = [r.mode for r in results if not r.ok()]
    if bad:
        console.print(f"[red]FAILED: wrong, lost or missing weights in {', '.join(bad)}")
        return 1
    console.print(f"[green]OK: every received version matched the trainer's digest ({', '.join(modes)})")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mode", choices=(*ALL_MODES, "all"), default=None,
                        help=f"transport (default: {FASTEST_MODE}, the fastest here); 'all' runs each in turn")
    parser.add_argument("--size", type=int, default=256, help="model size in MiB (default 256)")
    parser.add_argument("--layers", type=int, default=4, help="transformer blocks (default 4)")
    parser.add_argument("--steps", type=int, default=10, help="training steps, one version each (default 10)")
    parser.add_argument("--rollouts", type=int, default=2, help="rollout actors (default 2)")
    parser.add_argument("--step-seconds", type=float, default=0.2, help="simulated time per training step")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline of every wait, in seconds")
    parser.add_argument("--address", default=None, help="join this Ray cluster instead of starting one")
    parser.add_argument("--host", default=None, help="interface transfer servers bind (default: loopback for "
                        "the embedded cluster, the routable local address with --address)")
