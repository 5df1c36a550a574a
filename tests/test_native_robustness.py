"""Garbage of every type into every native entry point raises a Python exception; it never
crashes or hangs the interpreter. Runs in a subprocess so a crash fails the test instead of
killing pytest."""

from __future__ import annotations

import inspect

from _support import run_python

from weightwire import _native

SCRIPT = r'''
import itertools, socket, sys
import numpy as np
from weightwire import _native as n
from weightwire.errors import IntegrityError

GARBAGE = [None, "", "x" * 5000, "127.0.0.1\x00", "::1", "[::1]", "\udcff", b"\x00", -1, 0, 1,
           2**31, 2**63, 2**64, -2**63, 1.5, -0.0, float("nan"), float("inf"), float("-inf"),
           [], {}, (), object(), np.zeros(3), np.zeros((2, 2)).T, bytearray(8), memoryview(b"ro")]
# Valid values that would make a call wait long or allocate gigabytes are not garbage.
EXPENSIVE = (2**31, 2**63, 2**64)

# What garbage may raise: anything else (RuntimeError, SystemError, ...) means a path we did not
# think through, and fails the test.
EXPECTED = (TypeError, ValueError, OverflowError, OSError, MemoryError, BufferError, IntegrityError)

listener = n.Listener("127.0.0.1", 0, 4)
buf = n.HostBuffer(4096)
plan = n.ChunkPlan([100, 5000], 4096)
shared = n.HostBuffer(plan.total_bytes, shared=True)
n.stage_leaf(plan, shared, 0, bytes(100))
n.stage_leaf(plan, shared, 1, bytes(5000))
sender, receiver = socket.socketpair()
header = n.encode_frame_header(plan, 0, 7, 1)
valid = {
    "ChunkPlan": ([100, 5000], 4096),
    "stage_leaf": (plan, bytearray(plan.total_bytes), 1, bytes(5000), 1),
    "read_verified": (shared.fileno(), plan, bytearray(plan.total_bytes), 1),
    "send_stripe": (sender.fileno(), plan, shared, 0, 1, 7, 1, 1.0),
    "recv_stripe": (receiver.fileno(), plan, bytearray(plan.total_bytes), 0, 1, 7, 1, 0.01),
    "encode_frame_header": (plan, 0, 7, 1),
    "check_frame_header": (plan, 0, header, 7, 1),
    "format_endpoint": ("127.0.0.1", 80),
    "connect_tcp": ("127.0.0.1", 1, 0.5),
    "route_source": ("127.0.0.1",),
    "copy_into": (bytearray(64), 0, b"abc", 1),
    "crc32c": (b"abc", 0),
    "_crc32c_with": ("table", b"abc", 0),
    "Listener": ("127.0.0.1", 0, 4),
    "HostBuffer": (4096,),
    "Listener.accept": (0.01,),
}
calls = 0
for name, args in valid.items():
    target = listener.accept if name == "Listener.accept" else getattr(n, name)
    for position, value in itertools.product(range(len(args)), GARBAGE):
        expensive = type(value) is int and value in EXPENSIVE
        waits = name in ("connect_tcp", "Listener.accept", "send_stripe", "recv_stripe") and position == len(args) - 1
        if expensive and (name == "HostBuffer" or waits):
            continue
        trial = list(args)
        trial[position] = value
        try:
            result = target(*trial)
        except EXPECTED:
            pass
        else:
            for obj in (result,) if not isinstance(result, tuple) else result:
                if hasattr(obj, "close"):
                    obj.close()
        calls += 1
for name in ("list_interfaces", "page_size", "default_copy_threads", "cuda_runtime_path"):
    for extra in GARBAGE[:4]:
        try:
            getattr(n, name)(extra)
        except TypeError:
            calls += 1
for method in ("close", "fileno"):
    try:
        getattr(listener, method)(None)
    except TypeError:
        calls += 1
for kwargs in ({"alignment": v} for v in GARBAGE):
    try:
        n.HostBuffer(4096, **kwargs).close()
    except EXPECTED:
        pass
    calls += 1
listener.close()
buf.close()
for op in (lambda: memoryview(buf), lambda: buf.address, lambda: listener.accept(0.01),
           lambda: n.copy_into(buf, 0, b"x", 1)):
    try:
        op()
    except (ValueError, OSError):
        calls += 1
    else:
        raise SystemExit("a closed object allowed a use")
# Instances made with __new__ and never initialised (pybind/pybind11#6153): every use must raise.
for cls, uses in ((n.Listener, ("close", "fileno", "port", "host", "family", "closed")),
                  (n.HostBuffer, ("close", "nbytes", "address", "exports", "pinned", "__len__", "__repr__", "fileno")),
                  (n.ChunkPlan, ("total_bytes", "chunk_bytes", "leaf_offsets", "num_chunks", "crcs"))):
    raw = cls.__new__(cls)
    for use in uses:
        try:
            attr = getattr(raw, use)
            attr() if callable(attr) else None
        except TypeError:
            calls += 1
        else:
            raise SystemExit(f"{cls.__name__}.__new__ instance allowed {use}")
    for op in (lambda: memoryview(raw), lambda: n.copy_into(raw, 0, b"x", 1),
               lambda: n.copy_into(bytearray(4), 0, raw, 1),
               lambda: n.encode_frame_header(raw, 0, 7, 1),
               lambda: n.recv_stripe(-1, raw, bytearray(8), 0, 1, 7, 1, 0.01)):
        try:
            op()
        except TypeError:
            calls += 1
        else:
            raise SystemExit(f"{cls.__name__}.__new__ instance allowed a buffer use")
raw_listener = n.Listener.__new__(n.Listener)
try:
    raw_listener.accept(0.01)
except TypeError:
    calls += 1
sender.close()
receiver.close()
print("survived", calls)
'''


def test_garbage_into_every_native_entry_point_raises_never_crashes() -> None:
    result = run_python(SCRIPT, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("survived"), result.stdout
    assert int(result.stdout.split()[1]) > 200


def test_the_script_covers_every_native_function() -> None:
    public = {name for name in dir(_native) if not name.startswith("_")}
    functions = {n for n in public if inspect.isbuiltin(getattr(_native, n)) or isinstance(getattr(_native, n), type)}
    uncovered = {n for n in functions if f'"{n}"' not in SCRIPT}
    assert not uncovered, f"native entry points missing from the garbage script: {uncovered}"
