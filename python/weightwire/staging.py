"""Pinned host staging: page-aligned buffers, a pool that reuses them, and a fast copy in.

`HostBuffer(nbytes, *, alignment=PAGE_SIZE, lock=True, register_cuda=True)` is page-aligned host
memory with every page faulted in up front, best-effort locked with mlock and, when a CUDA runtime
can be loaded at run time, registered with it for DMA. `.pinned` says whether either happened; a
container that refuses mlock is not an error. `np.frombuffer(buf)` and `memoryview(buf)` are
zero-copy and keep the buffer alive; `close()` frees the memory at once and raises BufferError
while any such view is alive.

The aliasing hazard: an array built zero-copy on a staging buffer (numpy view, or a jax.Array that
aliases host memory) would silently change if the buffer were handed out again and overwritten.
StagingPool therefore never hands out a buffer while any view of it is alive, even after
`release()`: the buffer stays reserved until the last view is gone.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from collections.abc import Iterator

import numpy as np

from weightwire import _native
from weightwire._checks import int_arg, seconds_arg
from weightwire.errors import StagingExhaustedError

logger = logging.getLogger(__name__)

__all__ = ["PAGE_SIZE", "HostBuffer", "PoolStats", "StagingPool", "copy_into", "cuda_runtime_path"]

PAGE_SIZE: int = _native.page_size()
HostBuffer = _native.HostBuffer

# How often a waiting acquire() re-checks buffers whose views may have been dropped: dropping a
# view runs no Python code that could notify us.
_VIEW_RECHECK_S = 0.01
# More threads than this only adds start-up cost to a memory-bound copy.
_MAX_COPY_THREADS = 64


def cuda_runtime_path() -> str | None:
    """Path of the CUDA runtime HostBuffers register with, or None when none can be loaded."""
    return _native.cuda_runtime_path()


def _host_array(src: Any) -> np.ndarray:
    """src as a numpy array without copying when it is already in host memory (numpy arrays,
    CPU-resident jax arrays, bytes-like objects)."""
    if src is None:
        raise TypeError("src must be an array or a bytes-like object, got None")
    if isinstance(src, (bytes, bytearray, memoryview)):
        return np.frombuffer(src, dtype=np.uint8)
    arr = np.asarray(src)
    if arr.dtype.hasobject:
        raise TypeError(f"src has dtype {arr.dtype}: Python objects cannot be staged as bytes")
    return arr


def copy_into(dst: Any, src: Any, *, offset: int = 0, threads: int | None = None) -> int:
    """Copies the bytes of `src` into `dst` (a HostBuffer or any writable buffer) at `offset`.

    The copy runs without the GIL and is split over `threads` threads (default: what this machine
    has, up to 8) when it is large. Non-contiguous arrays are copied correctly, through numpy.
    Returns the number of bytes copied.
    """
    int_arg(offset, "offset", minimum=0)
    if threads is not None:
        int_arg(threads, "threads", minimum=0, maximum=_MAX_COPY_THREADS)
    arr = _host_array(src)
    with memoryview(dst) as out:  # TypeError for non-buffers, ValueError for a closed HostBuffer
        if out.readonly:
            raise TypeError(f"dst must be a writable buffer, got a read-only {type(dst).__name__}")
        if offset + arr.nbytes > out.nbytes:
            raise ValueError(f"copy of {arr.nbytes} bytes at offset {offset} does not fit a "
                             f"destination of {out.nbytes} bytes")
        if arr.flags.c_contiguous:
            # A uint8 view exports as a plain buffer whatever the dtype (bfloat16 cannot export itself).
            return _native.copy_into(out, offset, arr.reshape(-1).view(np.uint8), threads or 0)
        view = np.frombuffer(out.cast("B"), dtype=arr.dtype, count=arr.size, offset=offset)
        try:
            np.copyto(view.reshape(arr.shape), arr)
        finally:
            del view  # release the export before the memoryview closes
        return arr.nbytes


@dataclass(frozen=True)
class PoolStats:
    capacity_bytes: int
    allocated_bytes: int  # all buffers the pool holds memory for
    in_use_bytes: int  # acquired and not released
    buffers: int
    free_buffers: int  # released and reusable now
    viewed_buffers: int  # released, but reserved while views of them are alive


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


class StagingPool:
    """Reuses HostBuffers across transfers, holding at most `capacity_bytes` of them.

    acquire() hands out the smallest free buffer that fits, else allocates one, first freeing
    idle buffers if the cap requires; sizes are rounded up to whole pages. A request larger than
    the cap raises ValueError; one that cannot be met in time because buffers are in use raises
    StagingExhaustedError.
    """

    def __init__(
        self, capacity_bytes: int, *, alignment: int = PAGE_SIZE, lock: bool = True, register_cuda: bool = True
    ) -> None:
        int_arg(capacity_bytes, "capacity_bytes (at least one page)", minimum=PAGE_SIZE)
        self.capacity_bytes = capacity_bytes
        self._alignment = alignment
        self._lock = lock
        self._register_cuda = register_cuda
        self._cond = threading.Condition()
        self._free: list[HostBuffer] = []
        self._in_use: dict[int, HostBuffer] = {}
        self._closed = False

    def _allocated(self) -> int:
        held = [*self._free, *self._in_use.values()]
        return sum(b.nbytes for b in held if not b.closed)

    def _take_free(self, nbytes: int) -> HostBuffer | None:
        self._free = [b for b in self._free if not b.closed]  # closed by their user: nothing to reuse
        fits = [b for b in self._free if b.nbytes >= nbytes and b.exports == 0]
        if not fits:
            return None
        best = min(fits, key=lambda b: b.nbytes)
        self._free.remove(best)
        return best

    def _make_room(self, nbytes: int) -> bool:
        """Frees idle buffers, largest first, until nbytes more fit under the cap."""
        idle = sorted((b for b in self._free if b.exports == 0), key=lambda b: b.nbytes, reverse=True)
        for buffer in idle:
            if self._allocated() + nbytes <= self.capacity_bytes:
                break
            try:
                buffer.close()
            except BufferError:  # a view appeared since the check: keep the buffer reserved
                continue
            self._free.remove(buffer)
        return self._allocated() + nbytes <= self.capacity_bytes

    def acquire(self, nbytes: int, *, timeout_s: float = 0.0) -> HostBuffer:
        """A buffer of at least `nbytes`, waiting up to timeout_s for others to be released."""
        int_arg(nbytes, "nbytes", minimum=1)
        seconds_arg(timeout_s, "timeout_s")
        size = _round_up(nbytes, PAGE_SIZE)
        if size > self.capacity_bytes:
            raise ValueError(f"request of {nbytes} bytes ({size} rounded to pages) exceeds the "
                             f"pool's capacity of {self.capacity_bytes} bytes")
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                if self._closed:
                    raise ValueError("StagingPool is closed")
                buffer = self._take_free(size)
                if buffer is None and self._make_room(size):
                    buffer = HostBuffer(size, alignment=self._alignment, lock=self._lock,
                                        register_cuda=self._register_cuda)
                if buffer is not None:
                    self._in_use[id(buffer)] = buffer
                    return buffer
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StagingExhaustedError(
                        f"no staging buffer of {size} bytes within {timeout_s} s: "
                        f"{self._allocated()} of {self.capacity_bytes} bytes are in use or viewed")
                self._cond.wait(min(remaining, _VIEW_RECHECK_S))

    def release(self, buffer: HostBuffer) -> None:
        """Returns a buffer to the pool. Views of it may stay alive: it is not reused until they die."""
        with self._cond:
            if self._in_use.pop(id(buffer), None) is None:
                raise ValueError(f"{buffer!r} was not acquired from this pool (or was already released)")
            if self._closed:
                if buffer.exports == 0:
                    buffer.close()
            elif not buffer.closed:
                self._free.append(buffer)
            self._cond.notify_all()

    @contextmanager
    def lease(self, nbytes: int, *, timeout_s: float = 0.0) -> Iterator[HostBuffer]:
        """acquire() for the length of a with-block."""
        buffer = self.acquire(nbytes, timeout_s=timeout_s)
        try:
            yield buffer
        finally:
            self.release(buffer)

    def stats(self) -> PoolStats:
        with self._cond:
            return PoolStats(
                capacity_bytes=self.capacity_bytes,
                allocated_bytes=self._allocated(),
                in_use_bytes=sum(b.nbytes for b in self._in_use.values()),
                buffers=len(self._free) + len(self._in_use),
                free_buffers=sum(1 for b in self._free if b.exports == 0),
                viewed_buffers=sum(1 for b in self._free if b.exports > 0),
            )

    def close(self) -> None:
        """Frees every idle buffer now; buffers still acquired are freed when released, and viewed
        ones when their last view dies."""
        with self._cond:
            self._closed = True
            for buffer in self._free:
                if buffer.exports == 0:
                    buffer.close()
            self._free.clear()
            self._cond.notify_all()

    def __enter__(self) -> StagingPool:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
