"""Fixtures shared by the test files (kept in tests/kernel_helpers.py and registered here)."""

from tests.kernel_helpers import compiled_triton, interpreted_triton  # noqa: F401  (fixtures: pytest finds them by name)
