"""Shared test setup: NaN-filled fresh allocations, gpu marker, seeded RNG."""

import os

os.environ.setdefault("TRITON_F32_DEFAULT", "ieee")

import pytest
import torch


@pytest.fixture(autouse=True)
def _poison_uninitialized_memory():
    """torch.empty & co. return NaN-filled memory (ints: their max), so an output a kernel forgets
    to write fails the comparison instead of passing on leftover zeros."""
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_fill = torch.utils.deterministic.fill_uninitialized_memory  # type: ignore[attr-defined]
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True  # type: ignore[attr-defined]
    yield
    torch.use_deterministic_algorithms(prev_det, warn_only=prev_warn)
    torch.utils.deterministic.fill_uninitialized_memory = prev_fill  # type: ignore[attr-defined]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords or "sm90" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
