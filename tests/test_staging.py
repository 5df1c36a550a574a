"""weightwire.staging: HostBuffer, copy_into and StagingPool."""

from __future__ import annotations

import sys
import threading
import time

import ml_dtypes
import numpy as np
import pytest

from weightwire import StagingExhaustedError, staging
from weightwire.staging import PAGE_SIZE, HostBuffer, StagingPool

MiB = 1 << 20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} missing from /proc/self/status")


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


# --- HostBuffer ------------------------------------------------------------------------------

@pytest.mark.parametrize("alignment", [1, 64, PAGE_SIZE, 2 * MiB])
def test_buffers_are_at_least_page_aligned(alignment: int) -> None:
    with HostBuffer(3 * PAGE_SIZE + 5, alignment=alignment) as buf:
        assert buf.alignment == max(alignment, PAGE_SIZE)
        assert buf.address % buf.alignment == 0
        assert buf.nbytes == len(buf) == 3 * PAGE_SIZE + 5


def test_pages_are_faulted_in_up_front() -> None:
    before = _resident_bytes()
    with HostBuffer(64 * MiB, lock=False, register_cuda=False):
        assert _resident_bytes() - before >= 60 * MiB


def test_pinned_reports_what_actually_happened() -> None:
    locked_before = _status_kib("VmLck")
    with HostBuffer(4 * MiB) as buf:
        assert buf.pinned == (buf.locked or buf.cuda_registered)
        grew = (_status_kib("VmLck") - locked_before) * 1024
        # mlock may be refused here (container limits); whichever happened must be what it says.
        assert (grew >= 4 * MiB) == buf.locked
        if staging.cuda_runtime_path() is None:
            assert not buf.cuda_registered
    with HostBuffer(MiB, lock=False, register_cuda=False) as buf:
        assert not buf.pinned and not buf.locked and not buf.cuda_registered


def test_numpy_and_memoryview_are_zero_copy() -> None:
    with HostBuffer(PAGE_SIZE) as buf:
        arr = np.frombuffer(buf, dtype=np.uint32)
        assert arr.ctypes.data == buf.address
        arr[:] = 7
        view = memoryview(buf)
        assert view.nbytes == buf.nbytes and not view.readonly
        assert view[:4].tobytes() == np.uint32(7).tobytes()
        view[0] = 9
        assert arr[0] & 0xFF == 9
        del arr, view


def test_views_keep_the_memory_alive_after_the_buffer_object_is_dropped() -> None:
    buf = HostBuffer(PAGE_SIZE)
    arr = np.frombuffer(buf, dtype=np.uint8)
    del buf
    arr[:] = 3  # would be a use-after-free if the view did not own a reference
    assert int(arr.sum()) == 3 * PAGE_SIZE


def test_close_refuses_while_views_are_alive_then_frees() -> None:
    buf = HostBuffer(PAGE_SIZE)
    arr = np.frombuffer(buf, dtype=np.uint8)
    assert buf.exports == 1
    with pytest.raises(BufferError, match="1 view"):
        buf.close()
    del arr
    assert buf.exports == 0
    buf.close()
    assert buf.closed and "closed" in repr(buf)
    with pytest.raises(ValueError, match="closed"):
        memoryview(buf)
    with pytest.raises(ValueError, match="closed"):
        buf.address  # noqa: B018
    buf.close()  # closing twice is a no-op


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"nbytes": 0}, ValueError),
    ({"nbytes": -1}, ValueError),
    ({"nbytes": 1 << 62}, MemoryError),
    ({"nbytes": "1"}, TypeError),
    ({"nbytes": 10, "alignment": 3}, ValueError),
    ({"nbytes": 10, "alignment": 0}, ValueError),
    ({"nbytes": 10, "alignment": -4096}, ValueError),
    ({"nbytes": 10, "alignment": 1 << 31}, ValueError),
])
def test_bad_buffer_arguments_raise(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        HostBuffer(**kwargs)  # type: ignore[arg-type]


# --- copy_into -------------------------------------------------------------------------------

@pytest.mark.parametrize("nbytes", [1, 3, PAGE_SIZE + 1, 8 * MiB + 13, 33 * MiB + 7])
@pytest.mark.parametrize("threads", [None, 1, 2, 8])
def test_copy_is_exact_on_odd_sizes(nbytes: int, threads: int | None) -> None:
    src = np.random.default_rng(nbytes).integers(0, 256, nbytes, dtype=np.uint8)
    with HostBuffer(nbytes + 16) as buf:
        out = np.frombuffer(buf, dtype=np.uint8)
        out[:] = 0xAA
        assert staging.copy_into(buf, src, offset=5, threads=threads) == nbytes
        assert np.array_equal(out[5 : 5 + nbytes], src)
        assert (out[:5] == 0xAA).all() and (out[5 + nbytes :] == 0xAA).all()
        del out


@pytest.mark.parametrize("make", [
    lambda a: a[::2],
    lambda a: a.reshape(64, 64).T,
    lambda a: a.reshape(64, 64)[:, 3:40],
])
def test_non_contiguous_input_is_copied_correctly(make) -> None:  # type: ignore[no-untyped-def]
    src = make(np.arange(4096, dtype=np.float32))
    assert not src.flags.c_contiguous
    with HostBuffer(src.nbytes) as buf:
        assert staging.copy_into(buf, src) == src.nbytes
        got = np.frombuffer(buf, dtype=np.float32, count=src.size)
        assert np.array_equal(got, np.ascontiguousarray(src).reshape(-1))
        del got


def test_bfloat16_bytes_are_copied_bit_exact() -> None:
    src = np.random.default_rng(0).standard_normal(1000).astype(ml_dtypes.bfloat16)
    with HostBuffer(src.nbytes) as buf:
        staging.copy_into(buf, src)
        got = np.frombuffer(buf, dtype=ml_dtypes.bfloat16, count=src.size)
        assert got.tobytes() == src.tobytes()
        del got


def test_host_resident_jax_arrays_copy_exactly() -> None:
    import jax.numpy as jnp

    src = jnp.arange(10_000, dtype=jnp.int32) * 3
    with HostBuffer(src.nbytes) as buf:
        staging.copy_into(buf, src)
        got = np.frombuffer(buf, dtype=np.int32, count=src.size)
        assert np.array_equal(got, np.asarray(src))
        del got


def test_copy_that_does_not_fit_raises() -> None:
    with HostBuffer(PAGE_SIZE) as buf:
        with pytest.raises(ValueError, match="does not fit"):
            staging.copy_into(buf, np.zeros(PAGE_SIZE + 1, np.uint8))
        with pytest.raises(ValueError, match="does not fit"):
            staging.copy_into(buf, np.zeros(8, np.uint8), offset=PAGE_SIZE - 4)
        with pytest.raises(ValueError, match="does not fit"):
            staging.copy_into(buf, np.zeros((64, 64), np.uint8).T, offset=1)


@pytest.mark.parametrize(("src", "kwargs", "error"), [
    (None, {}, TypeError),
    (np.array([object()]), {}, TypeError),
    (np.zeros(4), {"offset": -1}, ValueError),
    (np.zeros(4), {"threads": -2}, ValueError),
    (np.zeros(4), {"offset": 1.5}, TypeError),
])
def test_copy_rejects_bad_sources_and_options(src: object, kwargs: dict[str, object], error: type[Exception]) -> None:
    with HostBuffer(PAGE_SIZE) as buf, pytest.raises(error):
        staging.copy_into(buf, src, **kwargs)  # type: ignore[arg-type]


def test_copy_into_a_readonly_destination_is_refused() -> None:
    with pytest.raises(TypeError, match="dst"):
        staging.copy_into(b"\x00" * 16, np.zeros(4, np.uint8))


# --- StagingPool -----------------------------------------------------------------------------

def test_pool_reuses_released_buffers() -> None:
    with StagingPool(16 * MiB) as pool:
        first = pool.acquire(MiB)
        address = first.address
        pool.release(first)
        second = pool.acquire(MiB - 100)  # rounds up to the same page count
        assert second is first and second.address == address
        stats = pool.stats()
        assert stats.buffers == 1 and stats.in_use_bytes == MiB and stats.allocated_bytes == MiB


def test_pool_never_exceeds_its_cap_and_evicts_idle_buffers() -> None:
    with StagingPool(4 * MiB) as pool:
        a = pool.acquire(3 * MiB)
        with pytest.raises(StagingExhaustedError, match="4194304"):
            pool.acquire(2 * MiB)
        assert pool.stats().allocated_bytes <= 4 * MiB
        pool.release(a)
        b = pool.acquire(4 * MiB)  # the idle 3 MiB buffer cannot serve this: freed to make room
        assert pool.stats().allocated_bytes == 4 * MiB
        assert a.closed and not b.closed
        pool.release(b)


def test_request_bigger_than_the_cap_is_a_clear_error() -> None:
    with StagingPool(MiB) as pool, pytest.raises(ValueError, match="exceeds the pool's capacity"):
        pool.acquire(MiB + 1)


@pytest.mark.parametrize("nbytes", [0, -5])
def test_pool_rejects_bad_sizes(nbytes: int) -> None:
    with StagingPool(MiB) as pool, pytest.raises(ValueError):
        pool.acquire(nbytes)


def test_waiting_acquire_gets_a_buffer_released_by_another_thread() -> None:
    with StagingPool(2 * MiB) as pool:
        held = pool.acquire(2 * MiB)
        waiting = threading.Event()
        got: list[HostBuffer] = []

        def waiter() -> None:
            waiting.set()
            got.append(pool.acquire(2 * MiB, timeout_s=10.0))

        thread = threading.Thread(target=waiter)
        thread.start()
        assert waiting.wait(5.0)
        pool.release(held)
        thread.join(10.0)
        assert got == [held]


def test_acquire_times_out_with_a_typed_error() -> None:
    with StagingPool(MiB) as pool:
        held = pool.acquire(MiB)
        start = time.monotonic()
        with pytest.raises(StagingExhaustedError, match="0.05 s"):
            pool.acquire(MiB, timeout_s=0.05)
        assert 0.05 <= time.monotonic() - start < 1.0
        pool.release(held)


def test_a_viewed_buffer_is_never_handed_out_again() -> None:
    with StagingPool(8 * MiB) as pool:
        buf = pool.acquire(MiB)
        view = np.frombuffer(buf, dtype=np.uint8)
        view[:] = 1
        pool.release(buf)
        assert pool.stats().viewed_buffers == 1
        other = pool.acquire(MiB)
        assert other is not buf
        np.frombuffer(other, dtype=np.uint8)[:] = 2
        assert (view == 1).all()
        del view
        pool.release(other)
        again = pool.acquire(MiB)  # with no views left, either buffer may be reused
        assert again in (buf, other)
        pool.release(again)


def test_a_jax_array_made_from_a_staging_buffer_does_not_change_when_the_buffer_is_reused() -> None:
    import jax

    with StagingPool(8 * MiB) as pool:
        buf = pool.acquire(MiB)
        host = np.frombuffer(buf, dtype=np.float32)
        host[:] = np.arange(host.size, dtype=np.float32)
        expected = host.copy()
        # On CPU, device_put may alias the numpy memory (zero-copy) or copy it; either way the
        # array must keep its values after the buffer goes back to the pool and is refilled.
        array = jax.device_put(host)
        del host
        pool.release(buf)
        for _ in range(3):
            reused = pool.acquire(MiB)
            np.frombuffer(reused, dtype=np.float32)[:] = -1.0
            pool.release(reused)
        assert np.array_equal(np.asarray(array), expected)


def test_release_of_a_foreign_or_double_released_buffer_raises() -> None:
    with StagingPool(MiB) as pool:
        buf = pool.acquire(PAGE_SIZE)
        pool.release(buf)
        with pytest.raises(ValueError, match="not acquired"):
            pool.release(buf)
        with HostBuffer(PAGE_SIZE) as foreign, pytest.raises(ValueError, match="not acquired"):
            pool.release(foreign)


def test_close_frees_idle_buffers_and_refuses_new_requests() -> None:
    pool = StagingPool(4 * MiB)
    idle = pool.acquire(MiB)
    held = pool.acquire(MiB)
    pool.release(idle)
    pool.close()
    assert idle.closed and not held.closed
    pool.release(held)  # released after close: freed at once
    assert held.closed
    with pytest.raises(ValueError, match="closed"):
        pool.acquire(PAGE_SIZE)


def test_a_buffer_closed_by_its_user_is_dropped_not_handed_out_again() -> None:
    with StagingPool(MiB) as pool:
        buf = pool.acquire(PAGE_SIZE)
        with buf:
            pass  # the user closes it
        pool.release(buf)
        again = pool.acquire(PAGE_SIZE)
        assert again is not buf and not again.closed
        assert pool.stats().allocated_bytes == PAGE_SIZE
        pool.release(again)


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"offset": 2**64}, ValueError), ({"threads": 2**32}, ValueError),
])
def test_copy_rejects_out_of_range_options(kwargs: dict[str, int], error: type[Exception]) -> None:
    with HostBuffer(PAGE_SIZE) as buf, pytest.raises(error):
        staging.copy_into(buf, np.zeros(4, np.uint8), **kwargs)


@pytest.mark.parametrize("src", [np.zeros(16, np.uint8), np.zeros((4, 4), np.uint8).T])
def test_copy_into_a_closed_buffer_is_a_valueerror_on_every_path(src: np.ndarray) -> None:
    buf = HostBuffer(PAGE_SIZE)
    buf.close()
    with pytest.raises(ValueError, match="closed"):
        staging.copy_into(buf, src)


def test_copy_releases_the_gil() -> None:
    # With a huge switch interval a thread that holds the GIL keeps it until it blocks or ends, so
    # the main thread can only observe the copy unfinished if copy_into released the GIL.
    src = np.ones(128 * MiB, dtype=np.uint8)
    about_to_copy = threading.Event()
    copy_returned = threading.Event()
    old_interval = sys.getswitchinterval()
    with HostBuffer(src.nbytes) as buf:

        def copy() -> None:
            about_to_copy.set()
            staging.copy_into(buf, src, threads=1)
            copy_returned.set()

        sys.setswitchinterval(30.0)
        try:
            worker = threading.Thread(target=copy)
            worker.start()
            assert about_to_copy.wait(30.0)
            seen_unfinished = not copy_returned.is_set()
        finally:
            sys.setswitchinterval(old_interval)
        worker.join(30.0)
        assert copy_returned.is_set()
        assert seen_unfinished, "the main thread could not run during the copy: the GIL was held"


def _crc32c_bitwise(data: bytes, crc: int = 0) -> int:
    """CRC32C one bit at a time, straight from the definition (RFC 3720, reflected 0x82F63B78)."""
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_every_crc32c_implementation_agrees_with_the_definition() -> None:
    """The folding path takes 256-byte steps from 512 bytes up and finishes the rest with the crc32
    instruction, so lengths around those edges, odd start addresses and nonzero starting CRCs
    are where a wrong fold constant or an off-by-one would show."""
    from weightwire import _native

    implementations = _native._crc32c_implementations()
    assert implementations[-1] == "table"
    data = np.random.default_rng(5).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    lengths = [0, 1, 7, 8, 255, 256, 511, 512, 513, 767, 768, 769, 1023, 1024, 1031, 4095, 4096, 4999]
    for length in lengths:
        for start, crc in ((0, 0), (1, 0x12345678), (3, 0xFFFFFFFF)):
            piece = data[start:start + length]
            expected = _crc32c_bitwise(piece, crc)
            got = {name: _native._crc32c_with(name, piece, crc) for name in implementations}
            assert set(got.values()) == {expected}, (length, start, got, expected)
            assert _native.crc32c(piece, crc) == expected
    big = np.random.default_rng(6).integers(0, 256, (3 << 20) + 77, dtype=np.uint8)
    assert len({_native._crc32c_with(name, big[1:], 9) for name in implementations}) == 1
    with pytest.raises(ValueError, match="CRC32C implementation pclmul-9000 is not available"):
        _native._crc32c_with("pclmul-9000", b"abc")


def test_crc32c_matches_the_standard_check_value_and_chains() -> None:
    from weightwire import _native

    assert _native.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)
    data = np.random.default_rng(3).integers(0, 256, 1 << 20, dtype=np.uint8)
    assert _native.crc32c(data[1000:], _native.crc32c(data[:1000])) == _native.crc32c(data)
    flipped = data.copy()
    flipped[12345] ^= 1
    assert _native.crc32c(flipped) != _native.crc32c(data)
