"""End to end on this kernel: real BPF, a kubelet-layout tree with
tmpfs secrets, pod processes in their own mount namespaces and cgroups."""
import json
import os
import subprocess
import time

import pytest

from harness import daemon_factory, metric_value  # noqa: F401  (fixture)
from tapio_node.sim.node import SA_MOUNT, VolumeSpec

pytestmark = pytest.mark.kernel


def _web_pod(node):
    return node.add_pod("shop", "web-0", [
        VolumeSpec("configmap", "app-config", {"app.yaml": b"a: 1\n", "conf.d/extra.yaml": b"x: 2\n"}),
        VolumeSpec("secret", "certs", {"tls.key": b"KEY\n", "tls.crt": b"CRT\n"}),
    ])


def _read(container, path, count=1, syscall="openat", chdir=None, mounts=None):
    r = container.start_reader(path, count=count, syscall=syscall, chdir=chdir, mounts=mounts)
    summary = r.wait()
    return summary


def _events_for(daemon, pid):
    return [e for e in daemon.lines if e["process"]["pid"] == pid]


def _bpf_fds(pid):
    """{"prog_id": {...}, "map_id": {...}, "link_id": {...}}: the BPF objects
    the process `pid` holds file descriptors to (from /proc, not system-wide)."""
    got = {"prog_id": set(), "map_id": set(), "link_id": set()}
    fdinfo = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(fdinfo):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            with open(os.path.join(fdinfo, fd)) as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            continue
        kind = {"anon_inode:bpf-prog": "prog_id", "anon_inode:bpf-map": "map_id",
                "anon_inode:bpf_link": "link_id"}.get(target)
        if kind:
            got[kind].add(int(fields[kind]))
    return got


def _bpftool_show(kind, ident):
    """`bpftool -j <prog|map|link> show id N` as a dict, or None when the id is gone."""
    r = subprocess.run(["bpftool", "-j", kind, "show", "id", str(ident)], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else None


def test_in_container_symlinked_key_path_exact_count(sim_node, daemon_factory):
    pod = _web_pod(sim_node)
    ctr = pod.add_container("nginx")
    d = daemon_factory(sim_node.write_config())
    summary = _read(ctr, "/run/secrets/certs/tls.key", count=50)
    assert summary["opened"] == 50
    got = d.wait_events(50, pred=lambda e: e["process"]["pid"] == summary["pid"])
    d.settle()
    got = _events_for(d, summary["pid"])
    assert len(got) == 50
    e = got[0]
    assert e["event_type"] == "secret_access"
    assert e["pod_uid"] == pod.uid
    assert e["volume_name"] == "certs"
    assert e["config_name"] == "certs"
    assert e["config_name_source"] == "volume_name"
    assert e["file"] == "tls.key"
    assert e["path"] == "/run/secrets/certs/tls.key"
    assert e["mount_path"] == pod.volume_dir("certs")
    assert e["process"]["cgroup_id"] == ctr.cgroup_id
    assert e["process"]["command"] == "python3" or e["process"]["command"].startswith("python")
    assert e["timestamp"].startswith(time.strftime("%Y-", time.gmtime()))
    # Every access has its own kernel timestamp, in order.
    stamps = [x["timestamp"] for x in got]
    assert stamps == sorted(stamps) and len(set(stamps)) == 50


@pytest.mark.parametrize("syscall", ["open", "openat", "openat2"])
def test_each_open_syscall(sim_node, daemon_factory, syscall):
    pod = _web_pod(sim_node)
    ctr = pod.add_container("app")
    d = daemon_factory(sim_node.write_config())
    summary = _read(ctr, "/run/config/app-config/app.yaml", count=3, syscall=syscall)
    assert summary["opened"] == 3, summary["errors"]
    d.wait_events(3, pred=lambda e: e["process"]["pid"] == summary["pid"])
    d.settle()
    got = _events_for(d, summary["pid"])
    assert [e["syscall"] for e in got] == [syscall] * 3
    assert {e["event_type"] for e in got} == {"configmap_access"}
    assert {e["file"] for e in got} == {"app.yaml"}


def test_exec_of_a_volume_file(sim_node, daemon_factory):
    """A script run from a ConfigMap: the kernel opens it for execve (seen
    at security_file_open; no open syscall, so the tracepoint backend does
    not), then its shell opens it again with openat."""
    pod = sim_node.add_pod("shop", "tools-0", [
        VolumeSpec("configmap", "tools", {"run.sh": b"#!/bin/sh\nexit 0\n"})], service_account=False)
    os.chmod(os.path.join(pod.volume_dir("tools"), "run.sh"), 0o755)
    ctr = pod.add_container("app")
    d = daemon_factory(sim_node.write_config())
    hook = json.loads(d.get("/healthz")[1])["backend"] != "tracepoint"
    proc = ctr.run(["/run/config/tools/run.sh"])
    assert proc.wait(timeout=60) == 0
    want = [("exec", "/run/config/tools/run.sh"), ("openat", "/run/config/tools/run.sh")]
    if not hook:
        want = want[1:]
    d.wait_events(len(want), pred=lambda e: e["process"]["pid"] == proc.pid)
    d.settle()
    got = _events_for(d, proc.pid)
    assert [(e["syscall"], e["path"]) for e in got] == want
    assert {(e["file"], e["config_name"]) for e in got} == {("run.sh", "tools")}


def test_open_by_handle_at(sim_node, daemon_factory):
    """A handle names no path at all; the Secret's tmpfs supports handles
    (a ConfigMap on an overlay disk may not)."""
    pod = _web_pod(sim_node)
    ctr = pod.add_container("app")
    d = daemon_factory(sim_node.write_config())
    summary = _read(ctr, "/run/secrets/certs/tls.crt", count=3, syscall="open_by_handle_at")
    assert summary["opened"] == 3, summary["errors"]
    d.wait_events(3, pred=lambda e: e["process"]["pid"] == summary["pid"])
    d.settle()
    got = _events_for(d, summary["pid"])
    assert [(e["syscall"], e["event_type"], e["file"], e["path"]) for e in got] == \
        [("open_by_handle_at", "secret_access", "tls.crt", "")] * 3


def test_relative_to_a_directory_fd(sim_node, daemon_factory):
    """openat/openat2 with a dirfd: the path string names no volume at all."""
    pod = _web_pod(sim_node)
    ctr = pod.add_container("app")
    d = daemon_factory(sim_node.write_config())
    pids = []
    for syscall in ("openat", "openat2"):
        summary = ctr.start_reader("tls.key", count=2, syscall=syscall, at="/run/secrets/certs").wait()
        assert summary["opened"] == 2
        pids.append(summary["pid"])
    d.wait_events(4, pred=lambda e: e["process"]["pid"] in pids)
    d.settle()
    got = [e for e in d.lines if e["process"]["pid"] in pids]
    assert sorted(e["syscall"] for e in got) == ["openat", "openat", "openat2", "openat2"]
    assert {(e["file"], e["path"], e["volume_name"]) for e in got} == {("tls.key", "tls.key", "certs")}


def test_relative_path_after_chdir(sim_node, daemon_factory):
    pod = _web_pod(sim_node)
    ctr = pod.add_container("app")
    d = daemon_factory(sim_node.write_config())
    summary = _read(ctr, "tls.crt", count=4, chdir="/run/secrets/certs")
    assert summary["opened"] == 4
    d.wait_events(4, pred=lambda e: e["process"]["pid"] == summary["pid"])
    d.settle()
    got = _events_for(d, summary["pid"])
    assert len(got) == 4
    assert {(e["file"], e["path"]) for e in got} == {("tls.crt", "tls.crt")}


def test_nested_key_and_projected_service_account(sim_node, daemon_factory):
    pod = _web_pod(sim_node)
    ctr = pod.add_container("app")
    d = daemon_factory(sim_node.write_config())
    s1 = _read(ctr, "/run/config/app-config/conf.d/extra.yaml")
    s2 = _read(ctr, f"{SA_MOUNT}/token")
    d.wait_events(1, pred=lambda e: e["process"]["pid"] == s2["pid"])
    d.settle()
    (nested,) = _events_for(d, s1["pid"])
    assert nested["file"] == "conf.d/extra.yaml"
    assert ".." not in nested["file"]
    (token,) = _events_for(d, s2["pid"])
    assert token["event_type"] == "projected_access"
    assert token["file"] == "token"
    assert token["volume_name"] == pod.service_account_volume


def test_no_events_for_unwatched_listing_and_failed_opens(sim_node, daemon_factory):
    pod = _web_pod(sim_node)
    ctr = pod.add_container("app")
    d = daemon_factory(sim_node.write_config())
    etc_hosts = os.path.join(pod.pod_dir, "etc-hosts")
    quiet = []
    quiet.append(_read(ctr, etc_hosts, count=5, mounts={}))
    missing = ctr.start_reader("/run/secrets/certs/nope", count=3)
    quiet.append(missing.wait())
    assert quiet[-1]["failed"] == 3
    # Refused by permissions (EACCES): never reaches any backend's hook.
    denied = sim_node.start_host_reader(os.path.join(pod.volume_dir("certs"), "tls.key"), count=3,
                                        user=65534, group=65534)
    quiet.append(denied.wait())
    assert quiet[-1]["failed"] == 3 and quiet[-1]["errors"] == {"EACCES": 3}, quiet[-1]
    # A directory listing of the volume opens the dir, never a key.
    ls = ctr.run(["ls", "-la", "/run/secrets/certs", "/run/secrets/certs/..data/"],
                 stdout=subprocess.DEVNULL)
    assert ls.wait(timeout=30) == 0
    # A marker access proves the daemon was delivering throughout.
    marker = _read(ctr, "/run/secrets/certs/tls.crt")
    d.wait_events(1, pred=lambda e: e["process"]["pid"] == marker["pid"])
    d.settle()
    pids = {q["pid"] for q in quiet} | {ls.pid}
    assert [e for e in d.lines if e["process"]["pid"] in pids] == []
    assert len(_events_for(d, marker["pid"])) == 1


def test_healthz_metrics_and_clean_sigterm(sim_node, daemon_factory):
    pod = _web_pod(sim_node)
    ctr = pod.add_container("app")
    d = daemon_factory(sim_node.write_config())
    status, body = d.get("/healthz")
    health = json.loads(body)
    assert status == 200
    assert health["status"] == "healthy" and health["ebpf_loaded"] is True
    assert health["focus"] == "config_access" and health["ring_buffer_active"] is True
    s1 = _read(ctr, "/run/secrets/certs/tls.key", count=7)
    s2 = _read(ctr, "/run/config/app-config/app.yaml", count=3)
    d.wait_events(10, pred=lambda e: e["process"]["pid"] in (s1["pid"], s2["pid"]))
    d.settle()
    _, metrics = d.get("/metrics")
    text = metrics.decode()
    # The namespace the test gave the pod, not one read back from the daemon.
    assert {e["namespace"] for e in _events_for(d, s1["pid"]) + _events_for(d, s2["pid"])} == {"shop"}
    assert metric_value(text, "kernel_monitor_secret_access_total", secret="certs", namespace="shop") == 7
    assert metric_value(text, "kernel_monitor_configmap_access_total", configmap="app-config",
                        namespace="shop") == 3
    assert json.loads(d.get("/healthz")[1])["events_processed"] >= 10
    ours = _bpf_fds(d.proc.pid)
    assert ours["prog_id"] and ours["link_id"] and ours["map_id"]
    rc, took = d.stop()
    assert rc == 0 and took < 5.0
    # Everything this daemon loaded is gone from the kernel: links, programs, maps.
    deadline = time.monotonic() + 5
    left = ours
    while time.monotonic() < deadline:
        left = {kind: {i for i in ids if _bpftool_show(kind.split("_")[0], i) is not None}
                for kind, ids in ours.items()}
        if not any(left.values()):
            break
        time.sleep(0.1)
    assert not any(left.values()), left
    assert not os.path.exists(os.path.join(d.config["pin_path"], "pod_info_map"))


def test_bpftool_sees_program_and_maps(sim_node, daemon_factory):
    """What the README's troubleshooting commands show, for this daemon's own
    programs and maps (another tapio-node on the machine does not count)."""
    ctr = _web_pod(sim_node).add_container("app")
    d = daemon_factory(sim_node.write_config())
    from tapio_node.kernel import backends

    backend = json.loads(d.get("/healthz")[1])["backend"]
    main = backends.HOOK_PROGRAMS.get(backend, "trace_config_access")
    ours = _bpf_fds(d.proc.pid)
    progs = [_bpftool_show("prog", i) for i in sorted(ours["prog_id"])]
    assert main in {p["name"] for p in progs}, progs
    # Each attached program of ours is one of the daemon's links, or (a
    # tracepoint before 5.15, which has no perf-event links) attached
    # through one of its perf events.
    links = [_bpftool_show("link", i) for i in sorted(ours["link_id"])]
    assert {link["prog_id"] for link in links} <= ours["prog_id"]
    perf = subprocess.run(["bpftool", "-j", "perf", "list"], capture_output=True, text=True, check=True).stdout
    attached = {link["prog_id"] for link in links} | {
        e["prog_id"] for e in json.loads(perf or "[]") if e.get("pid") == d.proc.pid}
    assert {p["id"] for p in progs if p["name"] == main} <= attached
    names = {m["name"]: m["id"] for m in (_bpftool_show("map", i) for i in ours["map_id"])}
    assert {"container_pids", "pod_info_map", "watched_inodes"} <= set(names), names
    pinned = os.path.join(d.config["pin_path"], "pod_info_map")
    shown = subprocess.run(["bpftool", "-j", "map", "show", "pinned", pinned],
                           capture_output=True, text=True, check=True)
    assert json.loads(shown.stdout)["id"] == names["pod_info_map"]
    # The pod correlation entry of the container: keyed by its cgroup id (u64).
    dump = subprocess.run(["bpftool", "-j", "map", "dump", "pinned", pinned], capture_output=True, text=True)
    assert dump.returncode == 0, dump.stderr
    keys = {int.from_bytes(bytes(int(b, 16) for b in e["key"]), "little") for e in json.loads(dump.stdout)}
    assert ctr.cgroup_id in keys, (ctr.cgroup_id, keys)


def test_bad_config_exits_2_naming_the_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("kernel_collector:\n  buffer_size: lots\n")
    r = subprocess.run([os.sys.executable, "-m", "tapio_node", "run", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "kernel_collector.buffer_size" in r.stderr
    cfg.write_text("kernel_collector:\n  monitor_secretz: true\n")
    r = subprocess.run([os.sys.executable, "-m", "tapio_node", "run", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "kernel_collector.monitor_secretz" in r.stderr and "unknown key" in r.stderr


def test_enter_stash_fallback_reports_the_same(sim_node, daemon_factory):
    """Kernels without bpf_task_pt_regs stash the filename at syscall entry."""
    pod = _web_pod(sim_node)
    ctr = pod.add_container("app")
    env = dict(os.environ, TAPIO_FORCE_ENTER_STASH="1")
    d = daemon_factory(sim_node.write_config(), env=env)
    assert any("paths from enter_stash" in line for line in d.stderr)
    s = _read(ctr, "tls.key", count=5, chdir="/run/secrets/certs", syscall="openat2")
    d.wait_events(5, pred=lambda e: e["process"]["pid"] == s["pid"])
    d.settle()
    got = _events_for(d, s["pid"])
    assert [(e["file"], e["path"], e["syscall"]) for e in got] == [("tls.key", "tls.key", "openat2")] * 5


def test_the_kfunc_free_object_reports_the_same(sim_node, daemon_factory):
    """Kernels before 6.2 get tapio-nokfunc.bpf.o (CO-RE probe reads instead
    of bpf_rdonly_cast); here it runs on this kernel too, so both builds
    are tested everywhere. A ConfigMap on disk exercises the parent walk."""
    from tapio_node.kernel import compat
    from tapio_node.kernel.loader import object_path

    path = object_path({**compat.probe(), compat.RDONLY_CAST: compat.Feature(
        name=compat.RDONLY_CAST, available=False, since="6.2", uses="")})
    assert path.endswith("tapio-nokfunc.bpf.o")
    pod = _web_pod(sim_node)
    ctr = pod.add_container("app")
    d = daemon_factory(sim_node.write_config(), env=dict(os.environ, TAPIO_BPF_OBJECT=path))
    s1 = _read(ctr, "/run/secrets/certs/tls.key", count=5)
    s2 = _read(ctr, "/run/config/app-config/conf.d/extra.yaml", count=3)
    d.wait_events(8, pred=lambda e: e["process"]["pid"] in (s1["pid"], s2["pid"]))
    d.settle()
    assert [e["file"] for e in _events_for(d, s1["pid"])] == ["tls.key"] * 5
    assert [e["file"] for e in _events_for(d, s2["pid"])] == ["conf.d/extra.yaml"] * 3
