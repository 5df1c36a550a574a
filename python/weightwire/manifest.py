"""What a published version looks like, and the check that a receiver's placeholder matches it.

The check runs before any byte moves: JAX's transfer server does no metadata check of its own, so
a float32 placeholder for bf16 weights, or a transposed sharding, would silently reinterpret bits.
jax is imported lazily; this module costs nothing at `import weightwire` time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from weightwire.errors import SpecMismatchError

# Per shard, in transfer order, per dimension: (start, stop) of the slice that shard holds.
Layout = tuple[tuple[tuple[int, int], ...], ...]


@dataclass(frozen=True)
class LeafSpec:
    path: str  # jax.tree_util.keystr of the leaf, e.g. "['layers'][0]['w']"
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    layout: Layout
    sharding: str  # for messages only


@dataclass(frozen=True)
class Manifest:
    """One version: (epoch, weight_id) identifies it; treedef and leaves describe it."""

    epoch: str
    weight_id: int
    treedef: Any  # jax PyTreeDef; travels only through Ray, which pickles it
    leaves: tuple[LeafSpec, ...]
    # Where the bytes are, per mode: None for jax (ask the trainer for an offer), a Ray ObjectRef
    # for ray, a CheckpointLocation for checkpoint.
    location: Any = None

    @property
    def nbytes(self) -> int:
        return sum(leaf.nbytes for leaf in self.leaves)


def layout_of(sharding: Any, shape: tuple[int, ...]) -> Layout:
    """Which slice each shard holds, in the order the transfer server moves shards."""
    indices = sharding.addressable_devices_indices_map(shape)
    return tuple(
        tuple((0, dim) if s is None else (s.start or 0, dim if s.stop is None else s.stop) for s, dim in
              zip(_as_slices(index, len(shape)), shape, strict=True))
        for index in indices.values()
    )


def _as_slices(index: Any, ndim: int) -> tuple[slice, ...]:
    index = tuple(index) if isinstance(index, tuple) else (index,)
    return tuple(index) + (slice(None),) * (ndim - len(index))


def flatten_with_paths(tree: Any) -> tuple[list[tuple[str, Any]], Any]:
    import jax

    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [(jax.tree_util.keystr(path), leaf) for path, leaf in leaves], treedef


def as_device_arrays(params: Any) -> Any:
    """params with numpy leaves moved to the default device; anything but arrays is refused."""
    import jax

    def convert(path: Any, leaf: Any) -> Any:
        if isinstance(leaf, jax.Array):
            return leaf
        if isinstance(leaf, (np.ndarray, np.generic)) and not leaf.dtype.hasobject:
            return jax.device_put(leaf)
        raise TypeError(f"leaf {jax.tree_util.keystr(path)} is a {type(leaf).__name__}; weights must be "
                        "jax.Array or numeric numpy arrays (None leaves are tree structure and are kept)")

    return jax.tree_util.tree_map_with_path(convert, params)


def build_manifest(params: Any, *, epoch: str, weight_id: int) -> Manifest:
    """The manifest of `params`, a pytree of jax.Array (see as_device_arrays)."""
    pairs, treedef = flatten_with_paths(params)
    leaves = tuple(
        LeafSpec(path=path, shape=tuple(leaf.shape), dtype=str(leaf.dtype), nbytes=int(leaf.nbytes),
                 layout=layout_of(leaf.sharding, tuple(leaf.shape)), sharding=repr(leaf.sharding))
        for path, leaf in pairs
    )
    return Manifest(epoch=epoch, weight_id=weight_id, treedef=treedef, leaves=leaves)


def _placeholder_sharding(leaf: Any, path: str) -> Any:
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        raise SpecMismatchError(f"placeholder leaf {path} ({type(leaf).__name__}) has no sharding; "
                                "pass jax.Arrays or ShapeDtypeStructs with shardings")
    return sharding


def check_placeholder(manifest: Manifest, placeholder: Any, *, check_layout: bool = True) -> list[Any]:
    """ShapeDtypeStructs to receive into, after checking `placeholder` against the manifest: tree
    structure, then per leaf shape, dtype and (for device-to-device modes, where shards move as
    they are) sharding layout. Raises SpecMismatchError naming the first leaf that differs."""
    import jax

    pairs, treedef = flatten_with_paths(placeholder)
    if treedef != manifest.treedef:
        offered = {leaf.path for leaf in manifest.leaves}
        mine = {path for path, _ in pairs}
        detail = (f"missing {sorted(offered - mine)[:3]}, unexpected {sorted(mine - offered)[:3]}"
                  if offered != mine else f"structure {treedef} vs offered {manifest.treedef}")
        raise SpecMismatchError(f"weight_id {manifest.weight_id}: placeholder tree differs from the "
                                f"published one: {detail}")
    specs = []
    for (path, leaf), spec in zip(pairs, manifest.leaves, strict=True):
        context = f"weight_id {manifest.weight_id}, leaf {path}"
        shape, dtype = tuple(getattr(leaf, "shape", ())), str(getattr(leaf, "dtype", type(leaf).__name__))
        if shape != spec.shape:
            raise SpecMismatchError(f"{context}: placeholder shape {shape}, offered {spec.shape}")
        if dtype != spec.dtype:
            raise SpecMismatchError(f"{context}: placeholder dtype {dtype}, offered {spec.dtype}; "
                                    "bits are never reinterpreted")
        sharding = _placeholder_sharding(leaf, path)
        if check_layout and layout_of(sharding, shape) != spec.layout:
            raise SpecMismatchError(f"{context}: placeholder sharding {sharding!r} splits the array "
                                    f"differently from the offered {spec.sharding}")
        specs.append(jax.ShapeDtypeStruct(shape, np.dtype(leaf.dtype), sharding=sharding))
    return specs


def placeholder_from_manifest(manifest: Manifest, shardings: Any = None) -> Any:
    """A placeholder tree built from the manifest, on `shardings`: None (the default device), one
    Sharding for every leaf, or a tree of shardings shaped like the weights."""
    import jax

    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        per_leaf = [shardings] * len(manifest.leaves)
    else:
        per_leaf = manifest.treedef.flatten_up_to(shardings)
    leaves = [jax.ShapeDtypeStruct(spec.shape, _dtype(spec.dtype), sharding=sharding)
              for spec, sharding in zip(manifest.leaves, per_leaf, strict=True)]
    return manifest.treedef.unflatten(leaves)


def _dtype(name: str) -> np.dtype:
    import jax.numpy as jnp

    return np.dtype(getattr(jnp, name, name))
