"""Shared pytest setup. Nothing here needs root."""

import os
import sys

import pytest

# Import tapio_node from this checkout even when it is not pip-installed.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)


def pytest_collection_modifyitems(config, items):
    # Everything under tests/kernel/ is a kernel test, so `-m "not kernel"` selects the fast ones.
    kernel_dir = os.path.join(REPO_ROOT, "tests", "kernel") + os.sep
    for item in items:
        if str(item.fspath).startswith(kernel_dir):
            item.add_marker(pytest.mark.kernel)


@pytest.fixture(scope="session")
def repo_root() -> str:
    """The checkout's root directory."""
    return REPO_ROOT
