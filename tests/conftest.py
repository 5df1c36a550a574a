"""Skips `gpu`-marked tests on machines without an NVIDIA GPU, before anything imports jax."""

from __future__ import annotations

import os
import shutil
from typing import Any

import pytest


def _has_nvidia_gpu() -> bool:
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


def pytest_collection_modifyitems(config: Any, items: list[pytest.Item]) -> None:
    if _has_nvidia_gpu():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
