"""Fixtures shared by the test files (the kernel ones kept in tests/kernel_helpers.py and registered here)."""

from pathlib import Path

import pytest
import torch

from tests.kernel_helpers import compiled_triton, interpreted_triton  # noqa: F401  (fixtures: pytest finds them by name)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A model folder holding a tiny random digits-architecture model (fast to sample, train and evaluate)."""
    from fastdiff.models import digits, save

    d = tmp_path_factory.mktemp("tiny")
    save(digits.build_model(0, digits.TINY_UNET_CONFIG, name="tiny"), d, dtype=torch.float32)
    return d
