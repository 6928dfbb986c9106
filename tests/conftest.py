"""Shared fixtures: where ../shared lives, and how a missing copy is treated (skip locally, fail in CI)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("NETSLIM_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))


def shared_path(rel: str) -> Path:
    """Path under ../shared; a missing file fails the test in CI and skips it elsewhere."""
    path = SHARED / rel
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is missing: CI needs ../shared beside the checkout", pytrace=False)
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Torch on one thread for the test, restored afterwards (timing- and order-independent results)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
