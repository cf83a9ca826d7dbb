"""The image `make image` builds, run by podman exactly as the DaemonSet
runs it, against a simulated node.

Marked slow and kernel; skipped unless TAPIO_TEST_IMAGE=1 or CI=true (a
skip fails under CI). Needs root, BPF, podman/runc/mmdebstrap/umoci (`make
deps`) and the Debian mirror (the image's packages).

1. `make image` (or the archive named by TAPIO_IMAGE): the .deb, then the
   OCI archive; `podman load` into a podman store of this test's own (a
   temp dir: nothing is left in the machine's store).
2. The podman flags come from deploy/kubernetes/ as kustomize builds it:
   hostPID, the capabilities (drop ALL, add the four), seccomp, no new
   privileges, read-only root, uid 0, every volume mount with its
   readOnly/mountPropagation, NODE_NAME from the downward API, the args,
   the memory and CPU limits, the ConfigMap's config.yaml. Host paths that
   a node has and this machine has not (/var/lib/kubelet/pods,
   /var/log/pods) are the simulated node's; the config differs from the
   ConfigMap's only in cgroup_root and pin_path (the simulated node's
   subtree and pin dir).
3. `tapio-node check` in the image passes.
4. The daemon runs in a pod network namespace of its own (held by a
   sleeping process, as the pause container holds a pod's), where the
   pods API (tests/integration/kube_api_server.py, HTTPS, bearer token)
   listens on 127.0.0.1; the container gets what the kubelet adds to a
   pod: the service-account dir (token, ca.crt, namespace) and
   KUBERNETES_SERVICE_HOST/PORT, so the pod specs come through the
   in-cluster config. The DaemonSet's httpGet probes are sent inside that
   namespace, as the kubelet sends them to the pod IP.
5. It becomes ready; then a pod is added (its Secret volume a new tmpfs,
   seen only through HostToContainer propagation) and put in the API, and
   a process in that pod's cgroup and mount namespace reads the key
   through its in-container path: the event on the container's stdout
   names the pod, the volume, the Secret (from the pod spec), the file and
   the reader (pod, container, command), with only the DaemonSet's
   capabilities in effect.
6. `podman stop` (SIGTERM) ends it with status 0.
"""
from __future__ import annotations

import ctypes
import json
import os
import queue
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

import deploy_manifests as dm
from tapio_node.sim.node import SimulatedNode, VolumeSpec
from tapio_node.sim.system import mount

TOP = Path(dm.REPO_ROOT)
# The .deb install test's helpers: run a command (raise with its output),
# remove a tree unless something is still mounted in it.
sys.path.insert(0, str(TOP / "tests" / "packaging"))
from test_deb import mounts_under, remove_tree, run  # noqa: E402
# The HTTPS pods API the pod-spec tests use.
sys.path.insert(0, str(TOP / "tests" / "integration"))
from kube_api_server import KubeAPIServer, TestPKI  # noqa: E402
ENABLED = os.environ.get("TAPIO_TEST_IMAGE") == "1" or os.environ.get("CI") == "true"
TOOLS = ("podman", "runc", "mmdebstrap", "umoci", "nsenter")
# The DaemonSet's host paths that only a Kubernetes node has.
NODE_ONLY = ("/var/lib/kubelet/pods", "/var/log/pods", "/var/lib/tapio-node")
MS_BIND, MS_SHARED = 4096, 1 << 20
CLONE_NEWNET = 0x40000000
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.kernel,
    pytest.mark.skipif(not ENABLED, reason="builds the image (a minute) and runs it under podman; "
                       "set TAPIO_TEST_IMAGE=1 or CI=true"),
]


def log(msg: str) -> None:
    print(f"[test_image {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_image() -> Path:
    if os.environ.get("TAPIO_IMAGE"):
        return Path(os.environ["TAPIO_IMAGE"]).resolve()
    t0 = time.monotonic()
    p = run(["make", "-C", str(TOP), "image"], stderr=subprocess.PIPE)
    log(f"make image took {time.monotonic() - t0:.0f} s")
    named = [ln.split()[1] for ln in p.stdout.splitlines() if ln.startswith("image: ")]
    assert named, f"make image did not name the archive:\n{p.stdout}"
    return TOP / named[-1]


class Podman:
    """podman with a store, run dir and tmp dir of its own under `base`."""

    def __init__(self, base: str):
        self.base = base
        self.argv = ["podman", "--root", f"{base}/root", "--runroot", f"{base}/run", "--tmpdir",
                     f"{base}/tmp", "--storage-driver", "overlay", "--events-backend", "none",
                     "--cgroup-manager", "cgroupfs",
                     # crun 1.8 refuses cgroup v1+v2 hybrid hosts with a v2 controller enabled.
                     "--runtime", "runc"]

    def __call__(self, *args, check=True, **kw):
        return run([*self.argv, *args], check=check, **kw)

    def close(self):
        self("rm", "--all", "--force", "--time", "10", check=False)
        # Unmounts the store's overlays too; then nothing may be mounted there.
        self("system", "reset", "--force", check=False)
        for mp in sorted(mounts_under(self.base), key=len, reverse=True):
            run(["umount", mp], check=False)
        remove_tree(self.base)


def podman_flags(docs, sources: dict[str, str], config_dir: str, node_name: str,
                 netns: str = "none") -> tuple[list[str], list[str]]:
    """(podman run flags, the container's args) for the DaemonSet's collector container.

    sources: host path -> the path to mount instead (this machine is no node);
    netns: the pod's network namespace (podman --network: none, ns:PATH)."""
    spec, c = dm.collector(docs)
    flags = []
    if spec.get("hostPID"):
        flags += ["--pid", "host"]
    flags += ["--network", "host" if spec.get("hostNetwork") else netns]
    sc = c["securityContext"]
    assert not sc.get("privileged")
    for cap in sc["capabilities"].get("drop", []):
        flags += ["--cap-drop", cap.lower()]
    for cap in sc["capabilities"].get("add", []):
        flags += ["--cap-add", cap]
    seccomp = sc.get("seccompProfile", {}).get("type", "Unconfined")
    flags += ["--security-opt", "seccomp=unconfined" if seccomp == "Unconfined" else "seccomp=default"]
    if sc.get("appArmorProfile", {}).get("type") == "Unconfined":
        flags += ["--security-opt", "apparmor=unconfined"]
    if sc.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    if sc.get("readOnlyRootFilesystem"):
        flags += ["--read-only", "--read-only-tmpfs=false"]
    flags += ["--user", f"{sc.get('runAsUser', 0)}:{sc.get('runAsGroup', 0)}"]
    for e in c.get("env", []):
        ref = e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        assert ref in (None, "spec.nodeName"), f"env {e['name']}: only spec.nodeName is simulated"
        flags += ["--env", f"{e['name']}={node_name if ref else e['value']}"]
    limits = c["resources"]["limits"]
    assert limits["memory"].endswith("Mi") and limits["cpu"].endswith("m")
    flags += ["--memory", f"{int(limits['memory'][:-2])}m", "--cpus", f"{int(limits['cpu'][:-1]) / 1000}"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    for m in c["volumeMounts"]:
        v = volumes[m["name"]]
        opts = ["ro" if m.get("readOnly") else "rw"]
        prop = m.get("mountPropagation", "None")
        assert prop in ("None", "HostToContainer"), prop
        opts.append("rslave" if prop == "HostToContainer" else "rprivate")
        if "hostPath" in v:
            src = sources.get(v["hostPath"]["path"], v["hostPath"]["path"])
            assert os.path.isdir(src), f"hostPath {src} (type {v['hostPath'].get('type')}) missing"
            flags += ["--volume", f"{src}:{m['mountPath']}:{','.join(opts)}"]
        elif "configMap" in v:
            flags += ["--volume", f"{config_dir}:{m['mountPath']}:ro"]
        elif "emptyDir" in v:
            size = v["emptyDir"].get("sizeLimit", "16Mi")
            assert v["emptyDir"].get("medium") == "Memory" and size.endswith("Mi")
            flags += ["--tmpfs", f"{m['mountPath']}:rw,size={int(size[:-2])}m,mode=1777"]
        else:
            raise AssertionError(f"volume {m['name']}: kind not simulated")
    return flags + ulimits(), list(c.get("args", []))


def ulimits() -> list[str]:
    """The kubelet's runtime sets no rlimits: a container keeps the node's.
    podman sets its own defaults (above this machine's hard limits, which
    root here lacks CAP_SYS_RESOURCE to raise), so pass the current ones;
    podman itself runs with RLIMIT_NPROC at most 32768."""
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
    nproc = [min(x, 32768) for x in resource.getrlimit(resource.RLIMIT_NPROC)]
    return ["--ulimit", f"nofile={nofile[0]}:{nofile[1]}", "--ulimit", f"nproc={nproc[0]}:{nproc[1]}"]


def probe(pid: int, docs, probe_name: str) -> tuple[int, dict]:
    """The DaemonSet's httpGet probe, sent from inside the container's network namespace."""
    _, c = dm.collector(docs)
    get = c[probe_name]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    url = f"http://127.0.0.1:{ports.get(get['port'], get['port'])}{get['path']}"
    code = ("import sys, urllib.request, urllib.error\n"
            "try:\n r = urllib.request.urlopen(sys.argv[1], timeout=5); print(r.status); print(r.read().decode())\n"
            "except urllib.error.HTTPError as e:\n print(e.code); print(e.read().decode())\n"
            "except OSError as e:\n print(0); print('{}')\n")
    p = run(["nsenter", f"--target={pid}", "--net", "--", sys.executable, "-I", "-c", code, url],
            stderr=subprocess.PIPE)
    status, _, body = p.stdout.partition("\n")
    return int(status), json.loads(body or "{}")


class PodNetwork:
    """A pod's network namespace with lo up, held by a sleeping process (the
    pause container's part), for the container and the API server to share."""

    def __init__(self):
        self.proc = subprocess.Popen(["unshare", "--net", "--", "sh", "-ec",
                                      "ip link set lo up; exec sleep infinity"])
        end = time.monotonic() + 30
        # exec'd into sleep: lo is up.
        while not os.path.realpath(f"/proc/{self.proc.pid}/exe").endswith("/sleep"):
            assert self.proc.poll() is None, f"unshare --net exited {self.proc.returncode}"
            assert time.monotonic() < end, "the pod network namespace did not come up in 30 s"
            time.sleep(0.05)
        self.path = f"/proc/{self.proc.pid}/ns/net"

    def call(self, fn):
        """fn() with this thread in the namespace (sockets it makes stay there)."""
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(self.path, os.O_RDONLY)
            try:
                if libc.setns(target, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {self.path}")
            finally:
                os.close(target)
            try:
                return fn()
            finally:
                if libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to the test's network namespace")
        finally:
            os.close(own)

    def close(self):
        self.proc.kill()  # by pid
        self.proc.wait()


CAP_NAMES = {2: "DAC_READ_SEARCH", 21: "SYS_ADMIN", 24: "SYS_RESOURCE", 38: "PERFMON", 39: "BPF"}


def caps_of(pid: int, field: str) -> set[str]:
    """The named capabilities of CAP_NAMES in /proc/<pid>/status `field`;
    any other capability in the set fails (the DaemonSet drops ALL)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            mask = int(line.split()[1], 16)
            bits = {b for b in range(64) if mask >> b & 1}
            if field == "CapEff":
                assert bits <= CAP_NAMES.keys(), f"pid {pid} has capabilities {sorted(bits - CAP_NAMES.keys())}"
            return {CAP_NAMES[b] for b in bits if b in CAP_NAMES}
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.fixture(scope="module")
def image():
    if os.geteuid() != 0:
        pytest.skip("needs root (podman, BPF, a simulated node)")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    assert not missing, f"not installed: {', '.join(missing)} (make deps)"
    archive = build_image()
    log(f"image archive {archive.name}: {archive.stat().st_size / 2**20:.1f} MiB")
    pm = Podman(tempfile.mkdtemp(prefix="tapio-podman-"))
    try:
        out = pm("load", "--input", str(archive)).stdout
        ref = [ln.split(": ", 1)[1] for ln in out.splitlines() if ln.startswith("Loaded image")][0]
        size = pm("image", "inspect", "--format", "{{.Size}}", ref).stdout.strip()
        log(f"loaded {ref}: {int(size) / 2**20:.1f} MiB unpacked")
        yield pm, ref
    finally:
        pm.close()


# `make image` keeps the image small: Debian's Essential set, python3 and
# the .deb's venv is about 100 MiB unpacked.
MAX_UNPACKED_MIB = 128


def test_image_defaults_to_container_mode(image):
    pm, ref = image
    cfg = json.loads(pm("image", "inspect", "--format", "{{json .Config}}", ref).stdout)
    assert cfg["Entrypoint"] == ["/usr/bin/tapio-node"]
    assert cfg["Cmd"] == ["run", "--config", "/etc/tapio-node/config.yaml", "--output", "stdout"]
    assert cfg.get("User") == "0:0"
    assert not any(e.startswith(("NOTIFY_SOCKET=", "JOURNAL_STREAM=")) for e in cfg.get("Env", []))
    size = int(pm("image", "inspect", "--format", "{{.Size}}", ref).stdout)
    assert size <= MAX_UNPACKED_MIB * 2**20, f"image is {size / 2**20:.0f} MiB unpacked"
    # No journald, no systemd in it: container mode is the only mode that works.
    p = pm("run", "--rm", "--network", "none", *ulimits(), "--entrypoint", "/bin/sh", ref, "-c",
           "test ! -e /lib/systemd/systemd && test ! -e /lib/systemd/systemd-journald && "
           "/usr/bin/tapio-node --version", check=False)
    assert p.returncode == 0 and p.stdout.startswith("tapio-node "), p.stdout


@pytest.fixture
def node():
    """A simulated node whose kubelet pods dir is a shared mount, as the
    kubelet makes it (so new volume mounts propagate into containers)."""
    n = SimulatedNode(node_name="sim-node-1")
    try:
        mount(n.pods_path, n.pods_path, None, MS_BIND)
        mount(None, n.pods_path, None, MS_SHARED)
        yield n
    finally:
        n.close()  # unmounts the volumes and the bind mount under its dir


def container_setup(docs, node, tmp_path, netns="none"):
    cfg = yaml.safe_load(dm.config_text(docs))
    cfg["kernel_collector"].update(cgroup_root=node.cgroup_root, pin_path=node.pin_path)
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    (config_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    state = tmp_path / "state"   # the access store's hostPath (DirectoryOrCreate)
    state.mkdir(mode=0o700)
    sources = {"/var/lib/kubelet/pods": node.pods_path, "/var/log/pods": node.logs_path,
               "/var/lib/tapio-node": str(state)}
    assert set(sources) == set(NODE_ONLY)
    return podman_flags(docs, sources, str(config_dir), node.node_name, netns)


def test_check_passes_in_the_image(image, node, tmp_path):
    pm, ref = image
    docs = dm.build()
    flags, args = container_setup(docs, node, tmp_path)
    log("podman run " + " ".join(flags))
    p = pm("run", "--rm", *flags, ref, "check", "--config", "/etc/tapio-node/config.yaml", check=False)
    log("tapio-node check in the image:\n" + p.stdout)
    assert p.returncode == 0, p.stdout
    assert "tapio-node can run here" in p.stdout
    assert "✔ capabilities (BPF): CAP_BPF and CAP_PERFMON effective" in p.stdout


@pytest.fixture
def pod_network():
    net = PodNetwork()
    try:
        yield net
    finally:
        net.close()


@pytest.fixture
def api(pod_network, tmp_path):
    """The pods API on 127.0.0.1 of the pod's network namespace (where the
    Service's cluster IP would lead), and the service-account dir the
    kubelet mounts for the DaemonSet's ServiceAccount (its token accepted)."""
    pki = TestPKI(str(tmp_path / "pki"))
    srv = pod_network.call(lambda: KubeAPIServer(pki, tokens={"tapio-node-sa-token"}).start())
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text("tapio-node-sa-token")
    (sa / "namespace").write_text(dm.one(dm.build(), "ServiceAccount")["metadata"]["namespace"])
    shutil.copy(pki.ca, sa / "ca.crt")
    try:
        yield srv, str(sa)
    finally:
        srv.stop()


def test_daemonset_container_reports_a_pod_open(image, node, pod_network, api, tmp_path):
    pm, ref = image
    srv, sa_dir = api
    docs = dm.build()
    spec, _ = dm.collector(docs)
    assert spec.get("automountServiceAccountToken", True)
    flags, args = container_setup(docs, node, tmp_path, netns=f"ns:{pod_network.path}")
    # What the kubelet adds to every pod: the service-account volume and the
    # API Service's address.
    flags += ["--volume", f"{sa_dir}:{SA_DIR}:ro", "--env", "KUBERNETES_SERVICE_HOST=127.0.0.1",
              "--env", f"KUBERNETES_SERVICE_PORT={srv.port}"]
    assert args[:1] == ["run"] and "stdout" in args
    name = f"tapio-test-{os.getpid()}"
    stderr_path = tmp_path / "daemon.stderr"
    with open(stderr_path, "w") as err:
        proc = subprocess.Popen([*pm.argv, "run", "--rm", "--name", name, *flags, ref, *args],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True)
    reader.start()
    try:
        # Ready: the readiness probe answers 200 (bounded: 120 s).
        pid, end, status = None, time.monotonic() + 120, (0, {})
        while status[0] != 200:
            assert proc.poll() is None, f"the container exited {proc.returncode}:\n{stderr_path.read_text()}"
            assert time.monotonic() < end, f"not ready in 120 s ({status}):\n{stderr_path.read_text()}"
            if pid is None:
                out = pm("inspect", "--format", "{{.State.Pid}}", name, check=False).stdout.strip()
                pid = int(out) if out.isdigit() and int(out) > 0 else None
            if pid is not None:
                status = probe(pid, docs, "readinessProbe")
            time.sleep(0.5)
        health = status[1]
        log(f"ready: /healthz {json.dumps(health)[:300]}")
        assert probe(pid, docs, "livenessProbe")[0] == 200
        # hostPID: the container's pid is a host pid. Its capabilities are
        # the DaemonSet's, less what this machine's root itself lacks.
        _, c = dm.collector(docs)
        granted = caps_of(pid, "CapEff")
        wanted = set(c["securityContext"]["capabilities"]["add"])
        assert granted == wanted & caps_of(os.getpid(), "CapBnd"), (granted, wanted)
        log(f"capabilities in effect: {', '.join(sorted(granted))}"
            + (f" (not grantable here: {', '.join(sorted(wanted - granted))})" if wanted - granted else ""))

        # A pod made after the container started: its Secret tmpfs reaches
        # the container only through HostToContainer propagation. The
        # Secret object's name is only in the pod spec, from the API.
        pod = node.add_pod("shop", "db-0", [VolumeSpec("secret", "db-credentials", {"password": b"s3cret"},
                                                       source_name="postgres-prod-credentials")],
                           service_account=False)
        ctr = pod.add_container("postgres")
        srv.put_pod(pod.manifest())
        # Names arrive asynchronously (namespace and pod name from the pod's
        # log dir, by inotify; the Secret's name from the API watch): read
        # until an event carries them. Every event names the pod uid, the
        # volume, the file and the reader.
        end, event, reads = time.monotonic() + 60, None, 0
        while event is None:
            assert time.monotonic() < end, f"no fully named secret_access event in 60 s:\n{stderr_path.read_text()}"
            r = ctr.start_reader("/run/secrets/db-credentials/password", count=1, comm="postgres")
            assert r.wait()["opened"] == 1
            reads += 1
            got = None
            while got is None:
                assert proc.poll() is None, f"the container exited {proc.returncode}:\n{stderr_path.read_text()}"
                assert time.monotonic() < end, f"no secret_access event in 60 s:\n{stderr_path.read_text()}"
                try:
                    line = lines.get(timeout=1.0)
                except queue.Empty:
                    continue
                e = json.loads(line)  # stdout carries JSON lines only
                # (The simulated kubelet's own writes of the volume are events too.)
                if e.get("event_type") == "secret_access" and e["process"].get("pid") == r.pid:
                    got = e
            assert (got["pod_uid"], got["volume_name"], got["file"]) == (pod.uid, "db-credentials", "password")
            assert (got["process"]["pod_uid"], got["process"]["container_id"], got["process"]["command"]) == (
                pod.uid, ctr.id, "postgres")
            if got["namespace"] is not None and got["config_name_source"] == "pod_spec":
                event = got
            else:
                time.sleep(0.2)
        log(f"{reads} read(s) until the event named the pod and the Secret")
        log(f"event: {json.dumps(event)[:400]}")
        assert (event["namespace"], event["pod_name"], event["config_name"], event["file"]) == (
            "shop", "db-0", "postgres-prod-credentials", "password")
        p = event["process"]
        assert (p["namespace"], p["pod_name"]) == ("shop", "db-0")
        assert event["cross_pod"] is False
        assert event["path"] == "/run/secrets/db-credentials/password"
        # In-cluster config: the daemon listed and watched this node's pods with the token.
        assert any(req["params"].get("fieldSelector") == f"spec.nodeName={node.node_name}"
                   and req["user"] == "token" and req["watch"] for req in srv.requests), srv.requests[:3]
    finally:
        stop = pm("stop", "--time", "20", name, check=False)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()  # by pid: the podman client; `pm.close()` removes the container
            proc.wait()
        reader.join(timeout=5)
    log(f"podman stop: {stop.stdout.strip()}; container exit {proc.returncode}")
    log("daemon stderr (tail):\n" + "\n".join(stderr_path.read_text().splitlines()[-8:]))
    assert proc.returncode == 0, f"exit {proc.returncode} on SIGTERM:\n{stderr_path.read_text()}"
