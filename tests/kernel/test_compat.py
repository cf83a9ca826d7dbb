"""The object loads on this kernel whatever it lacks, and what it lacks is
said: the loader, `check` and /healthz agree with the kernel's own BTF."""
import json
import os
import subprocess
import sys

import pytest

from harness import daemon_factory  # noqa: F401  (fixture)
from tapio_node.kernel import compat
from tapio_node.kernel.loader import Kernel, TRACEPOINT_OF, object_path, tracepoint_exists

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("require_root_bpf")]


def test_every_program_verifies_here():
    """Also the programs the daemon leaves off for a missing feature."""
    r = subprocess.run([sys.executable, "-m", "tapio_node.kernel.verify"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    for name in compat.probe():
        assert name in r.stdout
    from tapio_node import _fast

    obj = _fast.BpfObject(object_path())
    try:
        names = obj.programs()
    finally:
        obj.close()
    present = [n for n in names if n not in TRACEPOINT_OF or tracepoint_exists(TRACEPOINT_OF[n])]
    assert f"use_enter_stash=0: {len(present)} programs verified" in r.stdout
    assert f"use_enter_stash=1: {len(present)} programs verified" in r.stdout


def test_probes_answer_from_the_kernel_btf():
    btf = compat.Btf.load()
    assert btf.enum_has("bpf_func_id", "BPF_FUNC_map_lookup_elem")
    assert not btf.enum_has("bpf_func_id", "BPF_FUNC_tapio_no_such_helper")
    assert btf.type_id("task_struct", 4) is not None   # BTF_KIND_STRUCT
    assert compat.tracepoint_fields("syscalls/sys_exit_openat")[-1] == "ret"
    assert compat.tracepoint_fields("no_such/tracepoint") is None


def test_the_loader_follows_the_features():
    k = Kernel(pod_correlation=True)
    try:
        features = compat.probe()
        attached = set(k.programs())
        assert {f.name for f in k.features_off()} == {n for n, f in features.items() if not f.available}
        has_regs = features[compat.TASK_PT_REGS].available
        assert k.path_source == ("pt_regs" if has_regs else "enter_stash")
        assert ("stash_openat" in attached) == (not has_regs)
        assert ("trace_config_access_uring" in attached) == features[compat.URING_REQUEST].available
        assert {"trace_config_access", "track_fork", "track_exec", "track_exit", "track_attach"} <= attached
    finally:
        k.close()


def test_check_and_healthz_name_what_is_off(sim_node, daemon_factory):
    off = sorted(f.name for f in compat.missing(compat.probe()))
    r = subprocess.run([sys.executable, "-m", "tapio_node", "check"], capture_output=True, text=True,
                       timeout=300)
    for name in compat.probe():
        (line,) = [x for x in r.stdout.splitlines() if f"kernel feature {name}:" in x]
        assert line.startswith("⚠" if name in off else "✔"), line
    d = daemon_factory(sim_node.write_config())
    health = json.loads(d.get("/healthz")[1])
    assert sorted(health.get("kernel_features_off", [])) == off
    assert health["status"] == "healthy"
    for name in off:
        assert any(name in line and "kernel lacks" in line for line in d.stderr), name


def test_bss_writes_reach_the_kernel():
    """Globals user space sets after load (overflow_gen, wakeup_bytes) must be
    the programs' own: libbpf < 1.5 maps .bss for skeletons only, and a
    private copy silently kept overflow counting on one generation."""
    k = Kernel(pod_correlation=False)
    try:
        for value in (5, 0, 7):
            k.obj.set_u32(".bss", "overflow_gen", value)
            assert k.obj.get_u32(".bss", "overflow_gen") == value
            out = subprocess.run(["bpftool", "-j", "map", "dump", "id", str(_bss_map_id(k))],
                                 capture_output=True, text=True, check=True).stdout
            assert _btf_value(json.loads(out), "overflow_gen") == value
    finally:
        k.close()


def _bss_map_id(k) -> int:
    fd = k.obj.map_fd(".bss")
    with open(f"/proc/self/fdinfo/{fd}") as f:
        return int(dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)["map_id"])


def _btf_value(dump, name):
    for section in dump[0]["formatted"]["value"].values() if "formatted" in dump[0] else dump[0]["value"].values():
        for var in section:
            if name in var:
                return var[name]
    raise KeyError(name)
