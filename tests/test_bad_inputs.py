"""The bad-input catalogue: every public entry point given bad input raises the error class its
row names, with a message naming the input, and never crashes, hangs or guesses. The same table,
rendered, is docs/bad-inputs.md (regenerate with `python tests/test_bad_inputs.py >
docs/bad-inputs.md`); a test keeps the two equal.
"""

from __future__ import annotations

import math
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import weightwire as ww
from weightwire import net, staging

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"


@dataclass(frozen=True)
class Row:
    entry: str
    bad_input: str
    error: type[BaseException]
    call: Callable[[Any], Any]  # given the `live` fixture's (server, client)


def config(**fields: Any) -> ww.TransferConfig:
    return ww.TransferConfig(**fields)


PARAMS = {"w": np.ones(4, np.float32)}
ROWS = [
    Row("TransferConfig", "unknown mode", ValueError, lambda _: config(mode="nccl")),
    Row("TransferConfig", "mode=None", ValueError, lambda _: config(mode=None)),
    Row("TransferConfig", "empty coordinator_name", ValueError, lambda _: config(coordinator_name="")),
    Row("TransferConfig", "negative timeout_s", ValueError, lambda _: config(timeout_s=-1)),
    Row("TransferConfig", "infinite or NaN timeout_s", ValueError, lambda _: config(timeout_s=math.inf)),
    Row("TransferConfig", "timeout_s of 0", ValueError, lambda _: config(timeout_s=0)),
    Row("TransferConfig", "timeout_s as a str", TypeError, lambda _: config(timeout_s="5")),
    Row("TransferConfig", "transport_streams of 0", ValueError, lambda _: config(transport_streams=0)),
    Row("TransferConfig", "transfer_size as a float", TypeError, lambda _: config(transfer_size=1e9)),
    Row("TransferConfig", "max_parallel_copies of 1 (can wedge JAX)", ValueError,
        lambda _: config(max_parallel_copies=1)),
    Row("TransferConfig", "mode='checkpoint' without checkpoint_dir", ValueError, lambda _: config(mode="checkpoint")),
    Row("TransferConfig", "max_checkpoints of 0", ValueError, lambda _: config(max_checkpoints=0)),
    Row("TransferConfig", "native_streams of 65", ValueError, lambda _: config(native_streams=65)),
    Row("TransferConfig", "native_chunk_bytes below 4 KiB", ValueError, lambda _: config(native_chunk_bytes=100)),
    Row("TransferConfig", "native_shared_memory as a str", TypeError, lambda _: config(native_shared_memory="no")),
    Row("create_server / create_client", "None instead of a config", TypeError, lambda _: ww.create_server(None)),
    Row("create_server / create_client", "a dict instead of a config", TypeError,
        lambda _: ww.create_client({"mode": "jax"})),
    Row("create_server", "checkpoint_dir that does not exist", FileNotFoundError,
        lambda _: ww.create_server(config(mode="checkpoint", checkpoint_dir=f"/nonexistent/{uuid.uuid4().hex}"))),
    Row("create_server", "checkpoint_dir that is not writable", PermissionError,
        lambda _: ww.create_server(config(mode="checkpoint", checkpoint_dir="/proc"))),
    Row("create_server", "checkpoint_dir with an unknown URL scheme", ValueError,
        lambda _: ww.create_server(config(mode="checkpoint", checkpoint_dir="nosuch://bucket/x"))),
    Row("create_server", "host that is not an address or a known name", ValueError,
        lambda _: ww.create_server(config(mode="native", host="no such host!"))),
    Row("shutdown_coordinator", "None instead of a config", TypeError, lambda _: ww.shutdown_coordinator(None)),
    Row("serve_weights", "negative weight_id", ValueError, lambda live: live[0].serve_weights(-1, PARAMS)),
    Row("serve_weights", "weight_id of 2**63 (beyond int64)", ValueError,
        lambda live: live[0].serve_weights(1 << 63, PARAMS)),
    Row("serve_weights", "weight_id as a str, float or bool", TypeError,
        lambda live: live[0].serve_weights("1", PARAMS)),
    Row("serve_weights", "a Python object leaf", TypeError, lambda live: live[0].serve_weights(1000, {"w": object()})),
    Row("serve_weights", "a str leaf", TypeError, lambda live: live[0].serve_weights(1000, {"w": "text"})),
    Row("serve_weights", "an object-dtype array leaf", TypeError,
        lambda live: live[0].serve_weights(1000, {"w": np.array([object()])})),
    Row("serve_weights", "a list of ints as a leaf (not an array)", TypeError,
        lambda live: live[0].serve_weights(1000, {"w": [1, 2]})),
    Row("receive_weights", "placeholder with another tree", ww.SpecMismatchError,
        lambda live: live[1].receive_weights({"other": np.ones(4, np.float32)})),
    Row("receive_weights", "placeholder with another dtype", ww.SpecMismatchError,
        lambda live: live[1].receive_weights({"w": np.ones(4, np.int32)})),
    Row("receive_weights", "placeholder with another shape", ww.SpecMismatchError,
        lambda live: live[1].receive_weights({"w": np.ones(5, np.float32)})),
    Row("receive_weights", "negative timeout_s", ValueError, lambda live: live[1].receive_weights(None, timeout_s=-1)),
    Row("receive_weights", "timeout_s as a str", TypeError, lambda live: live[1].receive_weights(None, timeout_s="1")),
    Row("receive_weights", "wait as a str", TypeError, lambda live: live[1].receive_weights(None, wait="yes")),
    Row("net.parse_address", "no port", ValueError, lambda _: net.parse_address("127.0.0.1")),
    Row("net.parse_address", "port above 65535", ValueError, lambda _: net.parse_address(f"127.0.0.1:{1 << 16}")),
    Row("net.parse_address", "empty string", ValueError, lambda _: net.parse_address("")),
    Row("net.parse_address", "None", TypeError, lambda _: net.parse_address(None)),
    Row("net.bind", "negative port", ValueError, lambda _: net.bind("127.0.0.1", -1)),
    Row("net.bind", "empty host", ValueError, lambda _: net.bind("")),
    Row("net.connect", "negative timeout", ValueError, lambda _: net.connect("127.0.0.1:9", -1)),
    Row("net.connect", "infinite timeout", ValueError, lambda _: net.connect("127.0.0.1:9", math.inf)),
    Row("net.advertise", "port 0", ValueError, lambda _: net.advertise("0.0.0.0:0")),
    Row("staging.HostBuffer", "0 bytes", ValueError, lambda _: staging.HostBuffer(0)),
    Row("staging.HostBuffer", "negative size", ValueError, lambda _: staging.HostBuffer(-1)),
    Row("staging.HostBuffer", "more bytes than the machine has", MemoryError, lambda _: staging.HostBuffer(1 << 60)),
    Row("staging.HostBuffer", "alignment not a power of two", ValueError,
        lambda _: staging.HostBuffer(4096, alignment=3000)),
    Row("staging.copy_into", "None as the source", TypeError,
        lambda _: staging.copy_into(bytearray(8), None)),
    Row("staging.copy_into", "a read-only destination", TypeError, lambda _: staging.copy_into(b"12345678", b"1")),
    Row("staging.copy_into", "negative offset", ValueError, lambda _: staging.copy_into(bytearray(8), b"1", offset=-1)),
    Row("staging.copy_into", "a source larger than the destination", ValueError,
        lambda _: staging.copy_into(bytearray(8), b"123456789")),
    Row("staging.StagingPool", "capacity below one page", ValueError, lambda _: staging.StagingPool(1)),
]


def render() -> str:
    lines = ["# Bad inputs and the errors they raise", "",
             "Generated from `tests/test_bad_inputs.py`, which checks every row. All weightwire errors derive",
             "from `WeightTransferError`; argument errors are the builtin `TypeError` / `ValueError` (and",
             "`SpecMismatchError` is also a `ValueError`). Not errors, by design: an empty tree and `None`",
             "leaves round-trip as tree structure (`tests/test_modes.py`).", "",
             "| entry point | bad input | raises |", "|---|---|---|"]
    lines += [f"| `{row.entry}` | {row.bad_input} | `{row.error.__name__}` |" for row in ROWS]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def live(ray_cluster: Any) -> Iterator[tuple[Any, Any]]:
    """A server with one version out, and a client: what the call-time rows act on."""
    cfg = ww.TransferConfig(mode="native", coordinator_name=f"bad-{uuid.uuid4().hex[:8]}", host="127.0.0.1",
                            timeout_s=30.0)
    with ww.create_server(cfg) as server, ww.create_client(cfg) as client:
        assert server.serve_weights(1, PARAMS)
        yield server, client


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.entry}: {r.bad_input}" for r in ROWS])
def test_bad_input_raises_the_catalogued_error(row: Row, live: tuple[Any, Any]) -> None:
    with pytest.raises(row.error) as info:
        row.call(live)
    assert str(info.value), "an error must say what was wrong"


def test_the_server_and_client_still_work_after_every_bad_call(live: tuple[Any, Any]) -> None:
    server, client = live
    assert server.serve_weights(2, PARAMS)
    update = client.receive_weights(None, wait=True, timeout_s=30)
    assert update is not None and update.weight_id == 2


def test_the_documented_catalogue_is_this_one() -> None:
    assert DOC.read_text() == render(), "regenerate: python tests/test_bad_inputs.py > docs/bad-inputs.md"


if __name__ == "__main__":
    sys.stdout.write(render())
