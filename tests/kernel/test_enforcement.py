"""The enforcement policy on this kernel: a pod's Secret and projected
files may be opened only by its own containers, the kubelet and what the
config allows. audit runs on every backend and blocks nothing; enforce
needs BPF LSM (the VM matrix rows booted with bpf in lsm=) and is refused,
with the fix, where the kernel lacks it."""
import json
import os
import signal
import subprocess
import sys

import pytest

from harness import daemon_factory, metric_value  # noqa: F401  (fixture)
from tapio_node.kernel import backends
from tapio_node.sim.node import VolumeSpec

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("require_root_bpf")]

KUBELET = "system.slice/kubelet.service"
BACKUP = "system.slice/backup.service"


def _victim(node, name="db-0"):
    return node.add_pod("prod", name, [
        VolumeSpec("secret", "db-credentials", {"password": b"p0\n"}),
        VolumeSpec("configmap", "app-config", {"app.yaml": b"v: 0\n"}),
    ])


def _config(node, mode, **kw):
    enforcement = {"mode": mode, **kw}
    return node.write_config(enforcement=enforcement)


class Scene:
    """One victim pod, its own container, a snooping pod with the victim's
    secret bind-mounted, and host processes in chosen cgroups."""

    def __init__(self, node):
        self.node = node
        self.victim = _victim(node)
        self.own = self.victim.add_container("postgres")
        self.snoop_pod = node.add_pod("dev", "snoop", [], service_account=False)
        self.snoop = self.snoop_pod.add_container("sh")
        self.secret = os.path.join(self.victim.volume_dir("db-credentials"), "password")
        self.config = os.path.join(self.victim.volume_dir("app-config"), "app.yaml")

    def own_read(self):
        return self.own.start_reader("/run/secrets/db-credentials/password").wait()

    def snoop_read(self, what="secret"):
        src = os.path.dirname(self.secret if what == "secret" else self.config)
        key = os.path.basename(self.secret if what == "secret" else self.config)
        return self.snoop.start_reader(f"/run/stolen/{key}", mounts={"/run/stolen": src}).wait()

    def host_read(self, cgroup=None):
        return self.node.start_host_reader(self.secret, cgroup=cgroup).wait()


def _events_of(d, summaries):
    pids = {s["pid"]: s for s in summaries}
    d.wait_events(len(pids), pred=lambda e: e["process"]["pid"] in pids)
    d.settle()
    return {e["process"]["pid"]: e for e in d.lines if e["process"]["pid"] in pids}


def _lsm_available():
    return backends.probe()[backends.LSM].ok


def test_audit_reports_what_enforce_would_deny_and_blocks_nothing(sim_node, daemon_factory):
    scene = Scene(sim_node)
    d = daemon_factory(_config(sim_node, "audit"))
    own, snoop, host, kubelet = (scene.own_read(), scene.snoop_read(), scene.host_read(),
                                 scene.host_read(cgroup=KUBELET))
    cm = scene.snoop_read("configmap")
    for s in (own, snoop, host, kubelet, cm):
        assert s["opened"] == 1 and s["failed"] == 0, s
    got = _events_of(d, [own, snoop, host, kubelet, cm])
    assert {k: got[s["pid"]]["policy"] for k, s in
            (("own", own), ("snoop", snoop), ("host", host), ("kubelet", kubelet), ("cm", cm))} == {
        "own": "allowed", "snoop": "would_deny", "host": "would_deny", "kubelet": "allowed",
        # a ConfigMap is not protected unless enforcement.kinds lists it
        "cm": "allowed"}
    text = d.get("/metrics")[1].decode()
    assert metric_value(text, "kernel_monitor_policy_violations_total", namespace="prod",
                        kind="secret", name="db-credentials", action="audit") == 2

    # SIGHUP: protect ConfigMaps too, and allow the backup unit on the host.
    with open(d.config_path, "w") as f:
        f.write(sim_node.config_yaml(
            listen_address=d.config["listen_address"],
            enforcement={"mode": "audit", "kinds": ["secret", "configmap"],
                         "allow_host_cgroups": ["backup.service"]}))
    mark = len(d.lines)
    d.proc.send_signal(signal.SIGHUP)
    d.wait_stderr("configuration reloaded")
    cm2, backup = scene.snoop_read("configmap"), scene.host_read(cgroup=BACKUP)
    got = _events_of(d, [cm2, backup])
    assert (got[cm2["pid"]]["policy"], got[backup["pid"]]["policy"]) == ("would_deny", "allowed")
    assert len(d.lines) > mark


def test_mode_off_gives_no_verdict(sim_node, daemon_factory):
    scene = Scene(sim_node)
    d = daemon_factory(_config(sim_node, "off"))
    snoop = scene.snoop_read()
    assert _events_of(d, [snoop])[snoop["pid"]]["policy"] is None


def test_enforce_needs_bpf_lsm(sim_node):
    """Where the kernel has no BPF LSM, `run` and `check` refuse enforce
    with the fix; where it has, `check` says it will enforce."""
    config = _config(sim_node, "enforce")
    c = subprocess.run([sys.executable, "-m", "tapio_node", "check", "--config", config],
                       capture_output=True, text=True, timeout=120)
    line = next(ln for ln in c.stdout.splitlines() if "enforcement:" in ln)
    if _lsm_available():
        assert "opens of protected volumes by other pods fail with EACCES" in line, c.stdout
        return
    assert c.returncode == 1 and "needs the lsm backend" in line and "lsm=" in line, c.stdout
    r = subprocess.run([sys.executable, "-m", "tapio_node", "run", "--config", config,
                        "--output", "stdout"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "enforcement.mode enforce needs the lsm backend" in r.stderr
    assert "add bpf to the kernel's lsm= boot parameter" in r.stderr


def test_enforce_needs_a_backend_that_can_deny(sim_node):
    r = subprocess.run([sys.executable, "-m", "tapio_node", "run", "--config",
                        sim_node.write_config(hook_backend="fentry", enforcement={"mode": "enforce"})],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "enforcement.mode: enforce needs hook_backend lsm or auto" in r.stderr, r.stderr


@pytest.mark.needs_bpf_lsm
def test_enforce_denies_other_pods_and_hosts(sim_node, daemon_factory):
    scene = Scene(sim_node)
    accessor = sim_node.add_pod("monitoring", "vault-agent-0", [], service_account=False)
    agent = accessor.add_container("agent")
    d = daemon_factory(_config(sim_node, "enforce", allow_pods=["monitoring/vault-agent-*"]))
    assert json.loads(d.get("/healthz")[1])["backend"] == backends.LSM
    own, snoop, host, kubelet, cm = (scene.own_read(), scene.snoop_read(), scene.host_read(),
                                     scene.host_read(cgroup=KUBELET), scene.snoop_read("configmap"))
    allowed_agent = agent.start_reader("/run/peek/password",
                                       mounts={"/run/peek": os.path.dirname(scene.secret)}).wait()
    assert own["opened"] == kubelet["opened"] == cm["opened"] == allowed_agent["opened"] == 1
    for s in (snoop, host):
        assert s["opened"] == 0 and s["errors"] == {"EACCES": 1}, s
    got = _events_of(d, [own, snoop, host, kubelet, cm, allowed_agent])
    assert [got[s["pid"]]["policy"] for s in (own, snoop, host, kubelet, cm, allowed_agent)] == [
        "allowed", "denied", "denied", "allowed", "allowed", "allowed"]
    e = got[snoop["pid"]]
    assert (e["namespace"], e["config_name"], e["process"]["pod_name"]) == ("prod", "db-credentials", "snoop")
    text = d.get("/metrics")[1].decode()
    assert metric_value(text, "kernel_monitor_policy_violations_total", namespace="prod",
                        kind="secret", name="db-credentials", action="deny") == 2

    # A pod made now reads its own secret at once: the kernel compares its
    # cgroup with the volume's owner, whatever user space has seen so far.
    # Its secret is written by the kubelet, as on a node: while enforcing, a
    # test process writing it would be denied (the new tmpfs is watched as
    # soon as it is mounted).
    fresh = sim_node.add_pod("prod", "db-1", [VolumeSpec("secret", "db-credentials", {})],
                             service_account=False)
    assert fresh.update_volume("db-credentials", {"password": b"p0\n"})
    first = fresh.add_container("postgres").start_reader("/run/secrets/db-credentials/password",
                                                         count=50).wait()
    assert first["opened"] == 50 and first["failed"] == 0, first
    # The kubelet updates the secret while enforcing (its writes are opens too).
    assert scene.victim.update_volume("db-credentials", {"password": b"p1\n"})


@pytest.mark.needs_bpf_lsm
def test_enforcement_outlives_a_crash_and_ends_with_sigterm(sim_node, daemon_factory):
    scene = Scene(sim_node)
    config = _config(sim_node, "enforce")
    pin = os.path.join(sim_node.pin_path, "enforce_link")
    d = daemon_factory(config)
    assert os.path.exists(pin)
    d.proc.send_signal(signal.SIGKILL)
    d.proc.wait()
    down = scene.snoop_read()
    assert down["errors"] == {"EACCES": 1}, down     # no daemon, still denied
    assert scene.own_read()["opened"] == 1
    d2 = daemon_factory(config)
    d2.wait_stderr("taken over from the previous run")
    assert scene.snoop_read()["errors"] == {"EACCES": 1}
    assert d2.stop()[0] == 0
    assert not os.path.exists(pin)
    after = scene.snoop_read()
    assert after["opened"] == 1 and after["failed"] == 0, after


def test_cgroupfs_driver_pods_are_told_apart_too(sim_node_factory, daemon_factory):
    """kubepods/<qos>/pod<uid>: the cgroupfs driver's names, '-' kept."""
    node = sim_node_factory(driver="cgroupfs")
    scene = Scene(node)
    d = daemon_factory(_config(node, "audit"))
    own, snoop = scene.own_read(), scene.snoop_read()
    got = _events_of(d, [own, snoop])
    assert (got[own["pid"]]["policy"], got[snoop["pid"]]["policy"]) == ("allowed", "would_deny")


def test_a_nested_cgroup_named_after_the_owner_does_not_pass_for_it(sim_node, daemon_factory):
    """A tenant may make cgroups below its container and name one like the
    victim's pod slice: the topmost pod cgroup above the opener is its pod."""
    scene = Scene(sim_node)
    d = daemon_factory(_config(sim_node, "audit"))
    fake = f"kubepods-besteffort-pod{scene.victim.uid.replace('-', '_')}.slice"
    container_dir = scene.snoop.cgroup_dir
    os.mkdir(os.path.join(container_dir, fake))
    scene.snoop.cgroup_dir = os.path.join(container_dir, fake)
    try:
        forged = scene.snoop_read()
    finally:
        scene.snoop.cgroup_dir = container_dir
    assert _events_of(d, [forged])[forged["pid"]]["policy"] == "would_deny"
