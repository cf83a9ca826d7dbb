"""Choosing a hook backend from what each can do (the kernel's answers are
tests/kernel/test_compat.py's)."""
import pytest

from tapio_node import config, host
from tapio_node.kernel import backends

A = backends.Availability


def _avail(lsm, fentry, tracepoint):
    return {backends.LSM: A(backend="lsm", ok=lsm, why="L", fix="add bpf"),
            backends.FENTRY: A(backend="fentry", ok=fentry, why="F"),
            backends.TRACEPOINT: A(backend="tracepoint", ok=tracepoint, why="T")}


@pytest.mark.parametrize("flags, first", [((True, True, True), "lsm"), ((False, True, True), "fentry"),
                                          ((False, False, True), "tracepoint")])
def test_auto_is_the_first_that_can_attach(flags, first):
    assert backends.candidates("auto", _avail(*flags))[0] == first


def test_a_forced_backend_that_cannot_attach_names_why_and_the_fix():
    with pytest.raises(backends.BackendUnavailable) as err:
        backends.candidates("lsm", _avail(False, True, True))
    assert "hook_backend lsm (lsm/file_open) cannot attach: L" in str(err.value)
    assert "fix: add bpf" in str(err.value)
    assert backends.candidates("tracepoint", _avail(True, True, True)) == ["tracepoint"]


def test_nothing_attaches():
    with pytest.raises(backends.BackendUnavailable, match="no hook backend can attach here: lsm: L"):
        backends.candidates("auto", _avail(False, False, False))


def test_config_accepts_the_same_names():
    assert config.HOOK_BACKENDS == backends.CHOICES


def test_active_lsms_from_the_boot_line(tmp_path, monkeypatch):
    real_open = open

    def fake_open(path, *a, **kw):
        if path == "/sys/kernel/security/lsm":
            raise FileNotFoundError(path)
        if path == "/proc/cmdline":
            return real_open(tmp_path / "cmdline", *a, **kw)
        if str(path).startswith("/boot/config-"):
            return real_open(tmp_path / "config", *a, **kw)
        return real_open(path, *a, **kw)

    (tmp_path / "cmdline").write_text("root=/dev/vda lsm=yama lsm=lockdown,capability,bpf quiet\n")
    monkeypatch.setattr("builtins.open", fake_open)
    assert host.active_lsms() == (["lockdown", "capability", "bpf"], "the lsm= boot parameter")
    (tmp_path / "cmdline").write_text("root=/dev/vda quiet\n")
    (tmp_path / "config").write_text('CONFIG_BPF_LSM=y\nCONFIG_LSM="landlock,lockdown,bpf"\n')
    lsms, why = host.active_lsms()
    assert lsms == ["landlock", "lockdown", "bpf"] and why.startswith("CONFIG_LSM in /boot/config-")
    (tmp_path / "config").write_text("CONFIG_BPF_LSM=y\n")
    lsms, why = host.active_lsms()
    assert lsms is None and "no lsm=" in why
