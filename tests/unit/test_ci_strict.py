"""Under CI=true or TAPIO_REQUIRE_KERNEL=1 a skipped kernel test fails the
run (tests/conftest.py); elsewhere, and for other tests, a skip stays a skip."""
import os

import pytest

pytest_plugins = ["pytester"]

CONFTEST = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conftest.py")

KERNEL_TESTS = """
import pytest

@pytest.fixture
def needs_root():
    pytest.skip("requires root")

def test_skips_in_setup(needs_root):
    pass

@pytest.mark.skipif(True, reason="requires BTF")
def test_skipif_mark():
    pass

def test_skips_in_call():
    pytest.skip("requires gcc")

def test_runs():
    pass

@pytest.mark.xfail(reason="known", strict=True)
def test_expected_failure():
    assert False
"""

KERNEL_MODULE_SKIP = """
import pytest

pytest.skip("requires systemd-journald", allow_module_level=True)

def test_never_collected():
    pass
"""

UNIT_TESTS = """
import pytest

def test_unit_skip():
    pytest.skip("not on this machine")
"""


@pytest.fixture
def tree(pytester, monkeypatch):
    """A checkout's tests/ with the real tests/conftest.py."""
    for name in ("CI", "TAPIO_REQUIRE_KERNEL"):
        monkeypatch.delenv(name, raising=False)
    with open(CONFTEST) as f:
        pytester.makepyfile(**{"tests/conftest.py": f.read()})
    pytester.makepyfile(**{"tests/kernel/test_k.py": KERNEL_TESTS, "tests/unit/test_u.py": UNIT_TESTS})
    return pytester


@pytest.mark.parametrize("env", [{}, {"CI": "false"}, {"TAPIO_REQUIRE_KERNEL": "0"}])
def test_skips_are_skips_outside_ci(tree, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    result = tree.runpytest("-p", "no:cacheprovider", "tests")
    result.assert_outcomes(passed=1, skipped=4, xfailed=1)


@pytest.mark.parametrize("env", [{"CI": "true"}, {"TAPIO_REQUIRE_KERNEL": "1"}])
def test_a_skipped_kernel_test_fails_in_ci(tree, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    result = tree.runpytest("-p", "no:cacheprovider", "-rA", "tests")
    assert result.ret != 0
    # Setup-time skips are reported as errors, call-time ones as failures; an
    # xfail is not a skip, and tests outside tests/kernel may still skip.
    result.assert_outcomes(passed=1, skipped=1, failed=1, errors=2, xfailed=1)
    out = result.stdout.str()
    for reason in ("requires root", "requires BTF", "requires gcc"):
        assert f"kernel test skipped where it must run (TAPIO_REQUIRE_KERNEL/CI): {reason}" in out, out


@pytest.mark.parametrize("ci", [False, True])
def test_a_kernel_module_skipped_whole_fails_in_ci(tree, monkeypatch, ci):
    tree.makepyfile(**{"tests/kernel/test_m.py": KERNEL_MODULE_SKIP})
    if ci:
        monkeypatch.setenv("CI", "true")
    result = tree.runpytest("-p", "no:cacheprovider", "tests")
    if not ci:
        result.assert_outcomes(passed=1, skipped=5, xfailed=1)
        return
    assert result.ret != 0
    result.assert_outcomes(errors=1)
    assert "kernel test skipped where it must run (TAPIO_REQUIRE_KERNEL/CI): " \
           "requires systemd-journald" in result.stdout.str()


def test_the_kernel_marker_selects_tests_kernel_only(tree):
    result = tree.runpytest("-p", "no:cacheprovider", "-m", "not kernel", "tests")
    result.assert_outcomes(skipped=1, deselected=5)


def test_ci_entry_point_exports_ci_true():
    run = os.path.join(os.path.dirname(CONFTEST), "..", ".ci", "run")
    with open(run) as f:
        lines = [line.strip() for line in f]
    assert "export CI=true" in lines
