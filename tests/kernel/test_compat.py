"""The object loads on this kernel whatever it lacks, and what it lacks is
said: the loader, `check` and /healthz agree with the kernel's own BTF."""
import json
import os
import subprocess
import sys

import pytest

from harness import daemon_factory  # noqa: F401  (fixture)
from tapio_node.kernel import backends, compat
from tapio_node.kernel.loader import Kernel, object_path
from tapio_node.kernel.verify import unloadable

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
    present = [n for n in names if n not in unloadable(names, backends.probe())]
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
        # What is off matters to the tracepoint backend only.
        assert {f.name for f in k.features_off()} == (
            {n for n, f in features.items() if not f.available} if k.backend == backends.TRACEPOINT else set())
        has_regs = features[compat.TASK_PT_REGS].available
        assert k.path_source == ("pt_regs" if has_regs else "enter_stash")
        assert {"track_fork", "track_exec", "track_exit", "track_attach"} <= attached
        if k.backend == backends.TRACEPOINT:
            assert ("stash_openat" in attached) == (not has_regs)
            assert ("trace_config_access_uring" in attached) == features[compat.URING_REQUEST].available
            assert "trace_config_access" in attached
        else:
            # One hook program; no syscall tracepoint program at all.
            assert backends.HOOK_PROGRAMS[k.backend] in attached
            assert not {n for n in attached if n.startswith(("trace_config_access", "stash_"))}
    finally:
        k.close()


def test_auto_picks_the_first_backend_that_attaches():
    """lsm where bpf is an active LSM, else fentry, else tracepoint (the VM
    matrix names the backend each row must get in TAPIO_EXPECT_BACKEND)."""
    avail = backends.probe()
    k = Kernel(pod_correlation=False)
    try:
        expected = os.environ.get("TAPIO_EXPECT_BACKEND")
        if expected:
            assert k.backend == expected, k.passed_over
        better = backends.ORDER[:backends.ORDER.index(k.backend)]
        assert set(k.passed_over) == set(better)
        # Each backend passed over was unavailable, or attached without running.
        for b in better:
            assert not avail[b].ok or "never ran" in k.passed_over[b], (b, k.passed_over[b])
        assert avail[k.backend].ok
    finally:
        k.close()


@pytest.mark.parametrize("backend", backends.ORDER)
def test_a_forced_backend_attaches_or_the_daemon_says_why(sim_node, backend):
    """hook_backend set to one this kernel does not allow: `run` exits 1
    before loading anything, with the reason `check` gives."""
    avail = backends.probe()
    if avail[backend].ok:
        try:
            k = Kernel(pod_correlation=False, hook_backend=backend)
        except Exception as exc:
            # Attachable but not running: lsm where bpf is not an active LSM.
            assert backend == backends.LSM and "never ran" in str(exc), exc
            return
        try:
            assert k.backend == backend
        finally:
            k.close()
        return
    r = subprocess.run([sys.executable, "-m", "tapio_node", "run", "--output", "stdout",
                        "--config", sim_node.write_config(hook_backend=backend)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert f"hook_backend {backend}" in r.stderr and avail[backend].why in r.stderr, r.stderr
    assert r.stdout == ""


def test_no_syscall_tracepoint_beside_a_hook(sim_node, daemon_factory):
    """The kernel's own view (bpftool perf list: the perf events our
    programs are attached through): with lsm or fentry the daemon holds no
    syscall tracepoint, with tracepoint it holds sys_exit_openat."""
    d = daemon_factory(sim_node.write_config())
    health = json.loads(d.get("/healthz")[1])
    out = subprocess.run(["bpftool", "-j", "perf", "list"], capture_output=True, text=True, check=True).stdout
    ours = {e.get("tracepoint") for e in json.loads(out or "[]") if e.get("pid") == d.proc.pid}
    syscall_tps = {t for t in ours if t and (t.startswith("sys_") or t == "sys_enter")}
    if health["backend"] == backends.TRACEPOINT:
        assert "sys_exit_openat" in syscall_tps, ours
    else:
        assert syscall_tps == set(), ours
        links = json.loads(subprocess.run(["bpftool", "-j", "link", "list"], capture_output=True,
                                          text=True, check=True).stdout or "[]")
        kinds = {(ln.get("type"), ln.get("attach_type")) for ln in links
                 if ln.get("prog_id") in _prog_ids(d.proc.pid)}
        want = ("tracing", "trace_fexit") if health["backend"] == backends.FENTRY else ("tracing", "lsm_mac")
        assert want in kinds, kinds
    _, metrics = d.get("/metrics")
    assert f'kernel_monitor_backend_info{{backend="{health["backend"]}"}} 1.0' in metrics.decode()


def _prog_ids(pid: int) -> set[int]:
    ids = set()
    for fd in os.listdir(f"/proc/{pid}/fdinfo"):
        try:
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                text = f.read()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("prog_id:"):
                ids.add(int(line.split()[1]))
    return ids


def test_check_and_healthz_name_what_is_off(sim_node, daemon_factory):
    """What the tracepoint backend runs without; a hook backend needs none of it."""
    d = daemon_factory(sim_node.write_config())
    health = json.loads(d.get("/healthz")[1])
    hook = health["backend"] in backends.HOOK_PROGRAMS
    off = [] if hook else sorted(f.name for f in compat.missing(compat.probe()))
    r = subprocess.run([sys.executable, "-m", "tapio_node", "check"], capture_output=True, text=True,
                       timeout=300)
    for name in compat.probe():
        (line,) = [x for x in r.stdout.splitlines() if f"kernel feature {name}:" in x]
        assert line.startswith("⚠" if name in off else "✔"), line
        if hook and not compat.probe()[name].available:
            assert f"the {health['backend']} backend does not need it" in line, line
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
