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


def _kernel_skips_fail() -> bool:
    # CI and the VM matrix must prove the kernel tests ran, not that they skipped.
    return os.environ.get("TAPIO_REQUIRE_KERNEL") == "1" or os.environ.get("CI") == "true"


def _fail_skip(report) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    reason = reason.removeprefix("Skipped: ")
    report.outcome = "failed"
    report.longrepr = f"kernel test skipped where it must run (TAPIO_REQUIRE_KERNEL/CI): {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    # An xfail is reported as skipped too; it is not a test that did not run.
    if (report.skipped and not hasattr(report, "wasxfail") and _kernel_skips_fail()
            and item.get_closest_marker("kernel")):
        _fail_skip(report)


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    # A kernel test module that skips as a whole (a module-level skip) never
    # reaches pytest_runtest_makereport.
    outcome = yield
    report = outcome.get_result()
    kernel_dir = os.path.join(REPO_ROOT, "tests", "kernel") + os.sep
    if report.skipped and _kernel_skips_fail() and str(collector.fspath).startswith(kernel_dir):
        _fail_skip(report)
