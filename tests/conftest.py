"""Fixtures shared by the mode tests; each test module defines its own `config`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import weightwire as ww


@pytest.fixture
def server(config: ww.TransferConfig) -> Iterator[Any]:
    with ww.create_server(config) as s:
        yield s


@pytest.fixture
def client(config: ww.TransferConfig, server: Any) -> Iterator[Any]:
    with ww.create_client(config) as c:
        yield c
