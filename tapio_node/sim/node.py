"""A real, kubelet-faithful simulated Kubernetes node, for the demo, tests and bench.

Everything is real (needs root): a kubelet pods tree under a temp dir with
secret and projected volumes each on their own tmpfs, the atomic writer's
``..data`` layout and update sequence, cgroup v2 dirs named as the systemd or
cgroupfs driver names them, ``/var/log/pods`` dirs, and container processes in
private mount namespaces that see their volumes at in-container paths.

    with SimulatedNode() as node:
        pod = node.add_pod("shop", "web", [VolumeSpec("configmap", "app-config", {"app.yaml": b"x: 1\\n"})])
        c = pod.add_container("web")
        proc = c.run(reader_argv("/run/config/app-config/app.yaml", count=5))  # sim.opener's
        r = c.start_reader("/run/config/app-config/app.yaml", count=5)  # set up, waits for go()
        r.go(); summary = r.wait()                                       # {"opened": 5, ...}

``close()`` (also run by ``with`` and at interpreter exit) kills every process
it started (by pid), unmounts every mount under the node's dir, removes its
cgroups and its temp dir; it is idempotent.
"""

from __future__ import annotations

import atexit
import base64
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass

from tapio_node.host import mounts_under
from tapio_node.k8snames import check_component, check_label, check_subdomain, name_suffix
from tapio_node.sim.atomic_writer import atomic_write, validate_payload
from tapio_node.sim.opener import Reader
from tapio_node.sim.system import MS_NODEV, MS_NOSUID, SimulationError, cgroup2_mount, kill_pids, mount, pid_alive, umount

__all__ = ["VolumeSpec", "SimulatedNode", "SimPod", "SimContainer", "sweep_stale"]

log = logging.getLogger("tapio_node.sim")

PLUGINS = {
    "configmap": "kubernetes.io~configmap",
    "secret": "kubernetes.io~secret",
    "projected": "kubernetes.io~projected",
    "downward-api": "kubernetes.io~downward-api",  # not watched by tapio-node: for negative tests
}
QOS_CLASSES = ("guaranteed", "burstable", "besteffort")
DRIVERS = ("systemd", "cgroupfs")
# Scope prefixes of the systemd driver per container runtime.
RUNTIME_SCOPE = {"containerd": "cri-containerd-", "crio": "crio-", "docker": "docker-"}
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
# A collector run on the node pins its maps in the node's pin_path, made under this bpffs.
BPFFS = "/sys/fs/bpf"
# The dir holding tapio_node: the processes started here import this same copy.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Scripts run in fresh processes with `python -I -S`: a container's init, the kubelet's write.
_HERE = os.path.dirname(os.path.abspath(__file__))
_CONTAINER_INIT = os.path.join(_HERE, "container_init.py")
_KUBELET_WRITE = os.path.join(_HERE, "kubelet_write.py")


# --------------------------------------------------------------------------
# cgroup helpers

def _cgroup_pids(cgroup_dir: str) -> list[int]:
    try:
        with open(os.path.join(cgroup_dir, "cgroup.procs")) as f:
            return [int(x) for x in f.read().split()]
    except FileNotFoundError:
        return []


def _empty_and_remove_cgroup_tree(top: str) -> None:
    """Kill (by pid) whatever still runs under ``top``, then rmdir it bottom-up."""
    if not os.path.isdir(top):
        return
    # Bounded waits: a killed task leaves cgroup.procs only once it has fully exited.
    for attempt in range(1000):
        pids = [p for d, _, _ in os.walk(top) for p in _cgroup_pids(d)]
        if not pids:
            break
        kill_pids(pids)
        time.sleep(0.01)
    else:
        raise SimulationError(f"processes still in {top} after SIGKILL: {pids}")
    for d, _, _ in os.walk(top, topdown=False):
        # A just-killed task can linger as a zombie member for a moment (EBUSY).
        for attempt in range(1000):
            try:
                os.rmdir(d)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if attempt == 999:
                    raise SimulationError(f"cannot remove cgroup {d}: {exc}") from exc
                time.sleep(0.01)


def child_env(env: dict[str, str] | None) -> dict[str, str]:
    env = dict(os.environ if env is None else env)
    # The reader must import tapio_node from any cwd inside the container.
    pp = env.get("PYTHONPATH")
    env["PYTHONPATH"] = _REPO_ROOT + (os.pathsep + pp if pp else "")
    return env


# --------------------------------------------------------------------------
# the node

@dataclass
class VolumeSpec:
    """A pod-spec volume: ``kind`` "configmap" | "secret" | "projected" | "downward-api"; ``name`` the
    pod-spec volume name; ``files`` key -> content (keys may be nested, "a/b.txt");
    ``source_name`` the ConfigMap/Secret object name (defaults to ``name``)."""
    kind: str
    name: str
    files: dict[str, bytes]
    source_name: str | None = None

    def __post_init__(self):
        if self.kind not in PLUGINS:
            raise ValueError(f"volume {self.name!r}: kind {self.kind!r} is not one of {', '.join(PLUGINS)}")
        check_label("volume name", self.name)
        validate_payload(self.files)
        if self.source_name is None:
            self.source_name = self.name


class SimContainer:
    """A container of a simulated pod: its cgroup dir and the processes run in it."""

    def __init__(self, pod: "SimPod", name: str, runtime: str = "containerd"):
        self.pod = pod
        self.name = name
        self.runtime = runtime
        self.id = secrets.token_hex(32)
        node = pod.node
        if node.driver == "systemd":
            leaf = f"{RUNTIME_SCOPE[runtime]}{self.id}.scope"
        else:
            leaf = self.id
        self.cgroup_dir = os.path.join(pod.cgroup_dir, leaf)
        os.mkdir(self.cgroup_dir)
        # bpf_get_current_cgroup_id() is the inode number of the cgroup v2 dir.
        self.cgroup_id = os.stat(self.cgroup_dir).st_ino
        self.log_dir = os.path.join(pod.log_dir, name)
        os.makedirs(self.log_dir, exist_ok=True)
        open(os.path.join(self.log_dir, "0.log"), "ab").close()
        os.makedirs(os.path.join(pod.pod_dir, "containers", name), exist_ok=True)
        self.processes: list[subprocess.Popen] = []

    def default_mounts(self) -> dict[str, str]:
        """In-container path -> host volume dir for every volume of the pod."""
        out = {}
        for vol in self.pod.volumes.values():
            if vol.kind == "projected" and vol.name.startswith("kube-api-access-"):
                out[SA_MOUNT] = self.pod.volume_dir(vol.name)
            elif vol.kind == "configmap":
                out[f"/run/config/{vol.name}"] = self.pod.volume_dir(vol.name)
            elif vol.kind == "secret":
                out[f"/run/secrets/{vol.name}"] = self.pod.volume_dir(vol.name)
            elif vol.kind == "projected":
                out[f"/run/projected/{vol.name}"] = self.pod.volume_dir(vol.name)
            else:
                out[f"/run/podinfo/{vol.name}"] = self.pod.volume_dir(vol.name)
        return out

    def run(self, argv: list[str], mounts: dict[str, str] | None = None, cwd: str | None = None,
            **popen_kwargs) -> subprocess.Popen:
        """Start ``argv`` in this container: private mount namespace, volumes bind-mounted
        (read-only) at their in-container paths (``mounts``: in-container path -> host dir,
        or host file for a subPath mount, which pins the file's inode as the kubelet's
        does; None -> ``default_mounts()``),
        moved into this container's cgroup before exec, then chdir to ``cwd``.
        Extra keyword arguments go to ``subprocess.Popen`` (stdout, pass_fds, env...)."""
        if not argv:
            raise ValueError("argv must not be empty")
        if self.pod.removed:
            raise SimulationError(f"pod {self.pod.namespace}/{self.pod.name} was removed")
        mounts = self.default_mounts() if mounts is None else mounts
        targets = sorted(mounts)
        for t in targets:
            if not os.path.isabs(t) or os.path.normpath(t) != t or t == "/":
                raise ValueError(f"in-container path {t!r} must be absolute and normalised, not '/'")
            if not (os.path.isdir(mounts[t]) or os.path.isfile(mounts[t])):
                raise ValueError(f"mount source {mounts[t]!r} for {t!r} is neither a directory nor a file")
            for other in targets:
                if other != t and t.startswith(other + "/"):
                    raise ValueError(f"in-container path {t!r} is inside another mount {other!r}")
        spec = {"cgroup_procs": os.path.join(self.cgroup_dir, "cgroup.procs"),
                "mounts": [[t, mounts[t]] for t in targets], "cwd": cwd}
        cmd = ["unshare", "--mount", "--propagation", "private",
               sys.executable, "-I", "-S", _CONTAINER_INIT, json.dumps(spec), *argv]
        popen_kwargs["env"] = child_env(popen_kwargs.get("env"))
        proc = subprocess.Popen(cmd, **popen_kwargs)
        self.processes.append(proc)
        self.pod.node._register(proc)
        return proc

    def start_reader(self, path: str, count: int = 1, syscall: str = "openat", chdir: str | None = None,
                     interval: float | None = None, at: str | None = None, mounts: dict[str, str] | None = None,
                     cwd: str | None = None, comm: str | None = None, vary_path: bool = False,
                     **popen_kwargs) -> "Reader":
        """Start a reader in this container; it is ready (set up) on return and opens after ``go()``."""
        start = lambda argv, **kw: self.run(argv, mounts=mounts, cwd=cwd, **kw)  # noqa: E731
        return Reader(start, dict(path=path, count=count, syscall=syscall, chdir=chdir, interval=interval, at=at,
                                  comm=comm, vary_path=vary_path), **popen_kwargs)

    def stop(self, grace: float = 2.0) -> None:
        """SIGTERM every process of the container, SIGKILL what is left after ``grace`` s."""
        pids = set(_cgroup_pids(self.cgroup_dir)) | {p.pid for p in self.processes if p.poll() is None}
        kill_pids(sorted(pids), signal.SIGTERM)
        for p in self.processes:
            try:
                p.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        kill_pids(_cgroup_pids(self.cgroup_dir))


class SimPod:
    """A pod of the simulated node."""

    def __init__(self, node: "SimulatedNode", namespace: str, name: str, uid: str, qos: str):
        self.node = node
        self.namespace = namespace
        self.name = name
        self.uid = uid
        self.qos = qos
        self.pod_dir = os.path.join(node.pods_path, uid)
        self.log_dir = os.path.join(node.logs_path, f"{namespace}_{name}_{uid}")
        self.cgroup_dir = node._pod_cgroup_dir(uid, qos)
        self.volumes: dict[str, VolumeSpec] = {}
        self.containers: dict[str, SimContainer] = {}
        self.tmpfs_mounts: list[str] = []
        self.removed = False
        self.last_kubelet_write: dict | None = None
        self.static_name: str | None = None  # the manifest's metadata.name of a static pod
        self.manifest_path: str | None = None

    def volume_dir(self, volume_name: str) -> str:
        vol = self.volumes.get(volume_name)
        if vol is None:
            raise KeyError(f"pod {self.namespace}/{self.name} has no volume {volume_name!r}; "
                           f"it has {sorted(self.volumes)}")
        return os.path.join(self.pod_dir, "volumes", PLUGINS[vol.kind], vol.name)

    @property
    def service_account_volume(self) -> str | None:
        for n in self.volumes:
            if n.startswith("kube-api-access-"):
                return n
        return None

    def manifest(self) -> dict:
        """The Pod object (as the API or a static manifest has it) behind this pod's volumes."""
        volumes = []
        for v in self.volumes.values():
            if v.kind == "configmap":
                volumes.append({"name": v.name, "configMap": {"name": v.source_name}})
            elif v.kind == "secret":
                volumes.append({"name": v.name, "secret": {"secretName": v.source_name}})
            elif v.name.startswith("kube-api-access-"):
                # What the ServiceAccount admission plugin injects.
                volumes.append({"name": v.name, "projected": {"defaultMode": 420, "sources": [
                    {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                    {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                    {"downwardAPI": {"items": [{"path": "namespace", "fieldRef": {
                        "apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
                ]}})
            elif v.kind == "projected":
                volumes.append({"name": v.name, "projected": {"sources": [{"configMap": {"name": v.source_name}}]}})
            else:
                volumes.append({"name": v.name, "downwardAPI": {"items": [
                    {"path": k, "fieldRef": {"fieldPath": "metadata.labels"}} for k in sorted(v.files)]}})
        name = self.static_name or self.name
        meta = {"name": name, "namespace": self.namespace}
        if not self.static_name:
            meta["uid"] = self.uid
        spec = {"nodeName": self.node.node_name, "containers": [
            {"name": c, "image": "registry.k8s.io/pause:3.9"} for c in (self.containers or ["main"])],
            "volumes": volumes}
        if self.service_account_volume:
            spec["serviceAccountName"] = "default"
        return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}

    def _add_volume(self, vol: VolumeSpec) -> None:
        if vol.name in self.volumes:
            raise ValueError(f"pod {self.namespace}/{self.name}: duplicate volume name {vol.name!r}")
        self.volumes[vol.name] = vol
        path = self.volume_dir(vol.name)
        os.makedirs(path, mode=0o750)
        if vol.kind in ("secret", "projected"):
            # Each secret/projected volume is its own tmpfs (own s_dev), as the kubelet does.
            mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
            self.tmpfs_mounts.append(path)
        atomic_write(path, vol.files)

    def update_volume(self, volume_name: str, files: dict[str, bytes], as_kubelet: bool = True) -> bool:
        """Replace the volume's content with the kubelet's atomic-writer sequence.

        With ``as_kubelet`` the write runs in a child process named ``kubelet`` in
        the node's ``kubelet.service`` cgroup (its reads of the old files are then
        the kubelet's, as on a real node). Returns False when nothing changed."""
        target = self.volume_dir(volume_name)
        validate_payload(files)
        self.volumes[volume_name].files = dict(files)
        if not as_kubelet:
            return atomic_write(target, files)
        spec = {"cgroup_procs": os.path.join(self.node.kubelet_cgroup, "cgroup.procs"), "repo": _REPO_ROOT,
                "target": target, "files": {k: base64.b64encode(v).decode() for k, v in files.items()}}
        r = subprocess.run([sys.executable, "-I", "-S", _KUBELET_WRITE], input=json.dumps(spec),
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise SimulationError(f"kubelet atomic write into {target} failed: {r.stderr.strip()}")
        # {"written", "cgroup" (v2 path), "comm"} of the simulated kubelet, for tests.
        self.last_kubelet_write = json.loads(r.stdout)
        return self.last_kubelet_write["written"]

    def add_container(self, name: str, runtime: str = "containerd") -> SimContainer:
        check_label("container name", name)
        if runtime not in RUNTIME_SCOPE:
            raise ValueError(f"runtime {runtime!r} is not one of {', '.join(RUNTIME_SCOPE)}")
        if name in self.containers:
            raise ValueError(f"pod {self.namespace}/{self.name} already has a container {name!r}")
        if self.removed:
            raise SimulationError(f"pod {self.namespace}/{self.name} was removed")
        c = SimContainer(self, name, runtime)
        self.containers[name] = c
        return c


class SimulatedNode:
    """A kubelet-faithful node in a temp dir. Use as a context manager, or call ``close()``."""

    def __init__(self, base_dir: str | None = None, cgroup_parent: str | None = None, driver: str = "systemd",
                 node_name: str = "sim-node"):
        check_subdomain("node_name", node_name)
        self.node_name = node_name
        if driver not in DRIVERS:
            raise ValueError(f"driver {driver!r} is not one of {', '.join(DRIVERS)}")
        if os.geteuid() != 0:
            raise SimulationError("a simulated node needs root (tmpfs mounts, cgroups, mount namespaces)")
        self.driver = driver
        self._closed = False
        self._procs: list[subprocess.Popen] = []
        self.pods: list[SimPod] = []
        self._created: list[str] = []  # paths to remove at close, in order
        self.cgroup_root = ""
        if base_dir is None:
            # The creator's pid in the name lets sweep_stale() tell abandoned nodes from live ones.
            self.base_dir = tempfile.mkdtemp(prefix=f"tapio-sim-{os.getpid()}-")
            self._created.append(self.base_dir)
        else:
            os.makedirs(base_dir, exist_ok=True)
            self.base_dir = os.path.realpath(base_dir)
            if os.path.lexists(os.path.join(self.base_dir, "var")):
                raise SimulationError(f"{self.base_dir}/var already exists; pass an empty base_dir")
            self._created.append(os.path.join(self.base_dir, "var"))
            self._created.append(os.path.join(self.base_dir, "etc"))
        atexit.register(self.close)
        try:
            self.pods_path = os.path.join(self.base_dir, "var/lib/kubelet/pods")
            self.logs_path = os.path.join(self.base_dir, "var/log/pods")
            self.static_pods_path = os.path.join(self.base_dir, "etc/kubernetes/manifests")
            for d in (self.pods_path, self.logs_path, self.static_pods_path):
                os.makedirs(d)
            parent = cgroup2_mount() if cgroup_parent is None else cgroup_parent
            if not os.path.isfile(os.path.join(parent, "cgroup.procs")):
                raise SimulationError(f"cgroup_parent {parent!r} is not a cgroup v2 dir (no cgroup.procs)")
            self.cgroup_root = os.path.join(parent, f"tapio-sim-{os.getpid()}-{secrets.token_hex(4)}")
            os.mkdir(self.cgroup_root)
            # What the kubelet and systemd create at start.
            for d in self._qos_dirs() + ["system.slice/kubelet.service"]:
                os.makedirs(os.path.join(self.cgroup_root, d))
            self.kubelet_cgroup = os.path.join(self.cgroup_root, "system.slice/kubelet.service")
            # The creator's pid again: maps pinned by a killed run are swept like its dirs.
            self.pin_path = os.path.join(BPFFS, f"tapio-sim-{os.getpid()}-{secrets.token_hex(4)}")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "SimulatedNode":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- naming

    def _qos_dirs(self) -> list[str]:
        if self.driver == "systemd":
            return ["kubepods.slice", "kubepods.slice/kubepods-burstable.slice",
                    "kubepods.slice/kubepods-besteffort.slice"]
        return ["kubepods", "kubepods/burstable", "kubepods/besteffort"]

    def _pod_cgroup_dir(self, uid: str, qos: str) -> str:
        if self.driver == "systemd":
            u = uid.replace("-", "_")
            if qos == "guaranteed":
                rel = f"kubepods.slice/kubepods-pod{u}.slice"
            else:
                rel = f"kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{u}.slice"
        else:
            rel = f"kubepods/pod{uid}" if qos == "guaranteed" else f"kubepods/{qos}/pod{uid}"
        return os.path.join(self.cgroup_root, rel)

    # -- pods

    def add_pod(self, namespace: str, name: str, volumes: list[VolumeSpec], uid: str | None = None,
                qos: str = "burstable", service_account: bool = True, static: bool = False) -> SimPod:
        """Create a pod the way the kubelet does: pod cgroup, pod dir, volumes
        (tmpfs for secret/projected), atomic-writer content, /var/log/pods dir.

        With ``static`` the pod comes from a manifest the node writes into
        ``static_pods_path`` (``<name>.yaml``, ``metadata.name: name``), and, as
        the kubelet does, the running pod is named ``<name>-<node_name>``."""
        self._check_open()
        check_label("namespace", namespace)
        check_subdomain("pod name", name)
        static_name = None
        if static:
            static_name, name = name, f"{name}-{self.node_name}"
            check_subdomain("static pod name", name)
        if qos not in QOS_CLASSES:
            raise ValueError(f"qos {qos!r} is not one of {', '.join(QOS_CLASSES)}")
        uid = str(uuid.uuid4()) if uid is None else uid
        check_component("pod uid", uid)
        if any(p.uid == uid for p in self.pods):
            raise ValueError(f"pod uid {uid!r} already exists on this node")
        pod = SimPod(self, namespace, name, uid, qos)
        pod.static_name = static_name
        self.pods.append(pod)
        try:
            os.makedirs(pod.cgroup_dir)
            os.makedirs(pod.pod_dir, mode=0o750)
            for sub in ("volumes", "plugins", "containers"):
                os.mkdir(os.path.join(pod.pod_dir, sub), 0o750)
            with open(os.path.join(pod.pod_dir, "etc-hosts"), "w") as f:
                f.write(f"127.0.0.1\tlocalhost\n10.244.0.10\t{name}\n")
            vols = list(volumes)
            if service_account:
                vols.append(VolumeSpec("projected", f"kube-api-access-{name_suffix()}", {
                    "token": _fake_token(namespace, name, uid),
                    "ca.crt": _FAKE_CA,
                    "namespace": namespace.encode(),
                }))
            for vol in vols:
                pod._add_volume(VolumeSpec(vol.kind, vol.name, dict(vol.files), vol.source_name))
            os.makedirs(pod.log_dir, mode=0o755)
            if static:
                pod.manifest_path = self.write_manifest(pod)
        except BaseException:
            self.remove_pod(pod)
            raise
        return pod

    def remove_pod(self, pod: SimPod) -> None:
        """Kubelet-style teardown: stop containers, unmount tmpfs volumes, remove
        volume dirs, pod dir, log dir and cgroups. Idempotent."""
        if pod.removed:
            return
        pod.removed = True
        errors = []
        for c in pod.containers.values():
            try:
                c.stop()
            except Exception as exc:  # keep tearing down
                errors.append(f"stop {c.name}: {exc}")
        for mp in reversed(pod.tmpfs_mounts):
            try:
                umount(mp)
            except OSError as exc:
                errors.append(str(exc))
        leftover = mounts_under(pod.pod_dir) if os.path.isdir(pod.pod_dir) else []
        if leftover:
            errors.append(f"mounts remain under {pod.pod_dir}: {leftover}")
        else:
            for d in (pod.pod_dir, pod.log_dir):
                shutil.rmtree(d, ignore_errors=True)
        if pod.manifest_path and os.path.exists(pod.manifest_path):
            os.remove(pod.manifest_path)
        try:
            _empty_and_remove_cgroup_tree(pod.cgroup_dir)
        except SimulationError as exc:
            errors.append(str(exc))
        if pod in self.pods:
            self.pods.remove(pod)
        if errors:
            raise SimulationError(f"teardown of pod {pod.namespace}/{pod.name}: " + "; ".join(errors))

    def write_manifest(self, pod: SimPod, directory: str | None = None) -> str:
        """Write ``pod.manifest()`` as YAML into ``directory`` (default: the static pods
        dir), named after the pod, via a temp file and rename; returns the path."""
        import yaml

        directory = self.static_pods_path if directory is None else directory
        path = os.path.join(directory, f"{pod.static_name or pod.name}.yaml")
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
        with open(tmp, "w") as f:
            yaml.safe_dump(pod.manifest(), f, sort_keys=False)
        os.rename(tmp, path)
        return path

    # -- host processes

    def run_host(self, argv: list[str], **popen_kwargs) -> subprocess.Popen:
        """Start a host process (no pod cgroup, host mount namespace), killed at close()."""
        self._check_open()
        popen_kwargs["env"] = child_env(popen_kwargs.get("env"))
        proc = subprocess.Popen(argv, **popen_kwargs)
        self._register(proc)
        return proc

    def start_host_reader(self, path: str, count: int = 1, syscall: str = "openat", chdir: str | None = None,
                          interval: float | None = None, at: str | None = None, comm: str | None = None,
                          cgroup: str | None = None, **popen_kwargs) -> "Reader":
        """A reader on the host (no pod cgroup): e.g. a cross-pod read of a volume's host path.
        cgroup: a host cgroup under the node's root to run it in, e.g.
        "system.slice/kubelet.service" (made if missing, removed at close)."""
        if cgroup is not None:
            procs = os.path.join(self.cgroup_root, cgroup, "cgroup.procs")
            os.makedirs(os.path.dirname(procs), exist_ok=True)

            def enter_cgroup():
                with open(procs, "w") as f:
                    f.write("0")
            popen_kwargs["preexec_fn"] = enter_cgroup
        return Reader(self.run_host, dict(path=path, count=count, syscall=syscall, chdir=chdir,
                                          interval=interval, at=at, comm=comm), **popen_kwargs)

    def _register(self, proc: subprocess.Popen) -> None:
        self._procs.append(proc)

    def _check_open(self) -> None:
        if self._closed:
            raise SimulationError("the simulated node is closed")

    # -- config

    def config_yaml(self, **overrides) -> str:
        """A tapio-node config (top-level ``kernel_collector:``) pointing at this node."""
        import yaml

        kc = {
            "kubelet_pods_path": self.pods_path,
            "pod_logs_path": self.logs_path,
            "cgroup_root": self.cgroup_root,
            "static_pods_path": self.static_pods_path,
            "node_name": self.node_name,
            "pin_path": self.pin_path,
            "listen_address": f"127.0.0.1:{_free_port()}",
            # Each node its own access store, removed with the node.
            "state_path": os.path.join(self.base_dir, "var/lib/tapio-node"),
        }
        kc.update(overrides)
        return yaml.safe_dump({"kernel_collector": kc}, sort_keys=False)

    def write_config(self, **overrides) -> str:
        """Write ``config_yaml(**overrides)`` into the node's dir; returns its path."""
        path = os.path.join(self.base_dir, "var", f"tapio-node-{secrets.token_hex(3)}.yaml")
        with open(path, "w") as f:
            f.write(self.config_yaml(**overrides))
        return path

    # -- teardown

    def close(self) -> None:
        """Kill every process, unmount everything, remove cgroups and dirs. Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        errors = []
        # First the pins: an enforcing LSM link a killed daemon left there
        # would deny the teardown's own reads.
        if os.path.isdir(getattr(self, "pin_path", "")):
            shutil.rmtree(self.pin_path, ignore_errors=True)
        for pod in list(self.pods):
            try:
                self.remove_pod(pod)
            except Exception as exc:
                errors.append(str(exc))
        for p in self._procs:
            if p.poll() is None:
                kill_pids([p.pid])
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                errors.append(f"process {p.pid} did not exit after SIGKILL")
        if self.cgroup_root:
            try:
                _empty_and_remove_cgroup_tree(self.cgroup_root)
            except Exception as exc:
                errors.append(str(exc))
        for mp in sorted(mounts_under(self.base_dir), key=len, reverse=True):
            if any(mp == c or mp.startswith(c + "/") for c in self._created):
                try:
                    umount(mp)
                except OSError as exc:
                    errors.append(str(exc))
        left = [mp for mp in mounts_under(self.base_dir)
                if any(mp == c or mp.startswith(c + "/") for c in self._created)]
        if left:
            errors.append(f"mounts remain, not removing files under them: {left}")
        else:
            for path in self._created:
                shutil.rmtree(path, ignore_errors=True)
        if errors:
            raise SimulationError("simulated node teardown: " + "; ".join(errors))


def sweep_stale(cgroup_parent: str | None = None, tmp_dir: str | None = None,
                bpffs_dir: str | None = None) -> list[str]:
    """Remove what simulated nodes of dead processes left behind (e.g. after a SIGKILL):
    ``tapio-sim-<pid>-*`` cgroups under the cgroup v2 mount (their processes are killed
    by pid), temp dirs (unmounted first) and pin dirs under bpffs (the maps pinned there
    by a collector run on the node). Nodes of live processes are not touched.
    Returns the paths removed."""
    removed = []
    parent = cgroup2_mount() if cgroup_parent is None else cgroup_parent
    tmp = tempfile.gettempdir() if tmp_dir is None else tmp_dir
    pins = BPFFS if bpffs_dir is None else bpffs_dir
    pat = re.compile(r"^tapio-sim-(\d+)-[0-9a-z_]+$")
    for kind, top in (("cgroup", parent), ("tmp", tmp), ("pins", pins)):
        try:
            names = os.listdir(top)
        except OSError:
            continue
        for name in names:
            m = pat.match(name)
            path = os.path.join(top, name)
            if not m or pid_alive(int(m.group(1))) or not os.path.isdir(path) or os.path.islink(path):
                continue
            try:
                if kind == "cgroup":
                    _empty_and_remove_cgroup_tree(path)
                elif kind == "tmp":
                    for mp in sorted(mounts_under(path), key=len, reverse=True):
                        umount(mp)
                    shutil.rmtree(path)
                else:
                    # Unlinking a pin drops the map once no process holds it.
                    shutil.rmtree(path)
            except (OSError, SimulationError) as exc:
                # One leftover that will not go must not stop this run.
                log.warning("stale %s not removed: %s", path, exc)
                continue
            removed.append(path)
    return removed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fake_token(namespace: str, name: str, uid: str) -> bytes:
    b64 = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=")  # noqa: E731
    header = b64({"alg": "RS256", "kid": "simulated"})
    claims = b64({"aud": ["https://kubernetes.default.svc"], "iss": "https://kubernetes.default.svc",
                  "kubernetes.io": {"namespace": namespace, "pod": {"name": name, "uid": uid},
                                    "serviceaccount": {"name": "default"}},
                  "sub": f"system:serviceaccount:{namespace}:default"})
    sig = base64.urlsafe_b64encode(secrets.token_bytes(64)).rstrip(b"=")
    return header + b"." + claims + b"." + sig


_FAKE_CA = (b"-----BEGIN CERTIFICATE-----\n"
            + base64.encodebytes(b"simulated cluster CA, not a real certificate " * 4)
            + b"-----END CERTIFICATE-----\n")
