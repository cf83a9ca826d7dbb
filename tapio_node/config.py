"""The YAML config: the `kernel_collector:` keys existing configs carry, plus ours,
validated at the edge with msgspec; typed structs inside."""
from __future__ import annotations

import ipaddress
import math
import os
import re
import socket

import msgspec
import yaml

DEFAULT_CONFIG_PATH = "/etc/tapio-node/config.yaml"


class ConfigError(Exception):
    """One line naming the key and the problem."""

    def __init__(self, key: str, problem: str, source: str | None = None):
        self.key = key
        self.problem = problem
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {problem}")


ENFORCEMENT_MODES = ("off", "audit", "enforce")
ENFORCEMENT_KINDS = ("configmap", "secret", "projected")


class Enforcement(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Who may open a pod's protected volumes: its own containers, the
    kubelet, host units and accessor pods listed here (tapio_node/policy)."""
    mode: str = "off"
    kinds: list[str] = msgspec.field(default_factory=lambda: ["secret", "projected"])
    # Host processes allowed, by the leaf name of their cgroup (a systemd unit).
    allow_host_cgroups: list[str] = msgspec.field(default_factory=lambda: ["kubelet.service"])
    # Accessor pods allowed to read other pods' volumes: "namespace/name-glob".
    allow_pods: list[str] = msgspec.field(default_factory=list)


class KernelCollector(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    # Keys existing kernel_collector configs carry.
    name: str = "kernel-config-monitor"
    buffer_size: int = 1000
    enable_ebpf: bool = True
    monitor_configmaps: bool = True
    monitor_secrets: bool = True
    enable_pod_correlation: bool = True
    syscall_sampling_rate: int = 0
    kubelet_pods_path: str = "/var/lib/kubelet/pods"
    configmap_volume_pattern: str = "kubernetes.io~configmap"
    secret_volume_pattern: str = "kubernetes.io~secret"
    # Ours.
    monitor_projected: bool = True
    projected_volume_pattern: str = "kubernetes.io~projected"
    pod_logs_path: str = "/var/log/pods"
    cgroup_root: str = "auto"
    listen_address: str = "127.0.0.1:9717"
    pin_path: str = "/sys/fs/bpf/tapio"
    # 4 MiB holds ~20 ms of 600k opens/s, so the reader can drain in big
    # batches under load (see daemon.BUSY_POLL_MS). It is mapped into the
    # daemon, so it counts in its RSS.
    ring_buffer_size: int = 4 << 20
    kubelet_cgroups: list[str] = msgspec.field(default_factory=lambda: ["kubelet.service"])
    kubelet_executables: list[str] = msgspec.field(default_factory=lambda: ["kubelet"])
    journal_fold_window: float = 10.0
    resync_interval: float = 60.0
    metrics_max_series: int = 10000
    # Entries of the watched_inodes map: one per file of every watched
    # volume. A volume that does not fit is reported, not fatal.
    max_watched_files: int = 262144
    # Where the kernel side hooks opens: auto picks the first of lsm,
    # fentry, tracepoint that attaches (tapio_node/kernel/backends.py).
    hook_backend: str = "auto"
    enforcement: Enforcement = msgspec.field(default_factory=Enforcement)
    # Pod specs (real ConfigMap/Secret names).
    kubeconfig: str | None = None
    node_name: str | None = None
    static_pods_path: str = "/etc/kubernetes/manifests"
    # The access store (<state_path>/access.db) and `tapio-node report`.
    state_path: str = "/var/lib/tapio-node"
    retention_days: int = 90
    # Seconds, or a duration such as 30s, 10m, 24h, 7d: new (reader,
    # object) pairs are learned, not alerted on, this long after the
    # store was created.
    learning_period: str | float = "24h"


class Config(msgspec.Struct, forbid_unknown_fields=True):
    kernel_collector: KernelCollector = msgspec.field(default_factory=KernelCollector)


_AT_RE = re.compile(r"^(.*?)(?: - at `\$\.?(.*)`)?$", re.S)


def _explain(err: msgspec.ValidationError) -> tuple[str, str]:
    match = _AT_RE.match(str(err))
    problem, where = match.group(1), match.group(2) or ""
    unknown = re.match(r"Object contains unknown field `(.+)`", problem)
    if unknown:
        key = f"{where}.{unknown.group(1)}" if where else unknown.group(1)
        return key, "unknown key (check the spelling; see tapio-node(8) for the keys)"
    return where or "(top level)", problem[0].lower() + problem[1:]


def _unyaml_mode(kc, source: str | None) -> None:
    """YAML 1.1 reads a bare `off` as false: `mode: off` means off."""
    en = kc.get("enforcement") if isinstance(kc, dict) else None
    if not isinstance(en, dict) or not isinstance(en.get("mode"), bool):
        return
    if en["mode"] is False:
        en["mode"] = "off"
    else:
        raise ConfigError("kernel_collector.enforcement.mode",
                          f"must be one of {', '.join(ENFORCEMENT_MODES)} (a bare on, yes or true "
                          "is YAML for true)", source)


def parse_config(text: str, source: str | None = None) -> Config:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "(file)"
        raise ConfigError(where, f"not valid YAML: {getattr(exc, 'problem', exc)}", source)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("(top level)", "expected a mapping with a `kernel_collector:` key", source)
    if raw.get("kernel_collector") is None:
        raw["kernel_collector"] = {}
    _unyaml_mode(raw["kernel_collector"], source)
    try:
        cfg = msgspec.convert(raw, Config)
    except msgspec.ValidationError as exc:
        key, problem = _explain(exc)
        raise ConfigError(key, problem, source)
    given = raw["kernel_collector"] if isinstance(raw["kernel_collector"], dict) else {}
    validate(cfg.kernel_collector, source, explicit=set(given))
    return cfg


def load_config(path: str | None) -> Config:
    """Read and validate a config file; None means the defaults (and the
    packaged /etc/tapio-node/config.yaml when it exists)."""
    if path is None:
        if not os.path.exists(DEFAULT_CONFIG_PATH):
            cfg = Config()
            validate(cfg.kernel_collector, None)
            return cfg
        path = DEFAULT_CONFIG_PATH
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}")
    return parse_config(text, path)


def _need_abs(kc: KernelCollector, key: str, source: str | None) -> str:
    value = getattr(kc, key)
    if not value or not os.path.isabs(value):
        raise ConfigError(f"kernel_collector.{key}", f"must be an absolute path, got {value!r}", source)
    return value


def _dir_or_parent(kc: KernelCollector, key: str, source: str | None, explicit: set) -> None:
    """A dir the kubelet has not made yet is fine: the daemon waits for
    it (and `tapio-node check` says so); a file in its place is not."""
    path = _need_abs(kc, key, source)
    if key in explicit and os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"kernel_collector.{key}", f"{path} is not a directory", source)


# Upper bounds keep a typo from pinning gigabytes of kernel or daemon memory.
SIZE_LIMITS = {
    "buffer_size": (1, 100_000),
    "metrics_max_series": (1, 1_000_000),
    "max_watched_files": (16, 1 << 22),
    "retention_days": (1, 3650),
}
# The ring is mapped into the daemon: it counts in its RSS.
MAX_RING_BUFFER = 1 << 28
# kernel.backends.CHOICES (not imported: validating a config loads no BPF code).
HOOK_BACKENDS = ("auto", "lsm", "fentry", "tracepoint")
# A day: longer intervals are typos, and a huge float overflows timers.
MAX_SECONDS = 86400.0


def validate(kc: KernelCollector, source: str | None, explicit: set | frozenset = frozenset()) -> None:
    def bad(key: str, problem: str):
        raise ConfigError(f"kernel_collector.{key}", problem, source)

    for key, (low, high) in SIZE_LIMITS.items():
        value = getattr(kc, key)
        if not low <= value <= high:
            bad(key, f"must be between {low} and {high}, got {value}")
    if kc.hook_backend not in HOOK_BACKENDS:
        bad("hook_backend", f"must be one of {', '.join(HOOK_BACKENDS)}, got {kc.hook_backend!r}")
    if not 0 <= kc.syscall_sampling_rate <= 1 << 31:
        bad("syscall_sampling_rate", "must be 0 (off) or a positive N (1 in N syscalls) up to 2^31")
    rb = kc.ring_buffer_size
    if rb < 4096 or rb > MAX_RING_BUFFER or rb & (rb - 1):
        bad("ring_buffer_size", f"must be a power of two between 4096 and {MAX_RING_BUFFER} bytes, got {rb}")
    for key in ("configmap_volume_pattern", "secret_volume_pattern", "projected_volume_pattern"):
        value = getattr(kc, key)
        if not value or "/" in value:
            bad(key, f"must be a kubelet volume plugin dir name like kubernetes.io~secret, got {value!r}")
    _dir_or_parent(kc, "kubelet_pods_path", source, explicit)
    _dir_or_parent(kc, "pod_logs_path", source, explicit)
    _need_abs(kc, "pin_path", source)
    _need_abs(kc, "static_pods_path", source)
    # Made at start when missing (the unit's StateDirectory= makes it);
    # empty turns the store off.
    if kc.state_path:
        _dir_or_parent(kc, "state_path", source, explicit)
    try:
        seconds = duration_seconds(kc.learning_period)
    except ValueError as exc:
        bad("learning_period", str(exc))
    if not 0 <= seconds <= 365 * 86400:
        bad("learning_period", "must be between 0 and 365d")
    if kc.cgroup_root != "auto":
        if not os.path.isdir(_need_abs(kc, "cgroup_root", source)):
            bad("cgroup_root", f"{kc.cgroup_root} is not a directory (use auto to find the cgroup v2 mount)")
    if kc.kubeconfig is not None and not os.path.isabs(kc.kubeconfig):
        bad("kubeconfig", f"must be an absolute path, got {kc.kubeconfig!r}")
    for key in ("journal_fold_window", "resync_interval"):
        if not math.isfinite(getattr(kc, key)):
            bad(key, f"must be a finite number of seconds, got {getattr(kc, key)}")
    if not 0 <= kc.journal_fold_window <= MAX_SECONDS:
        bad("journal_fold_window", f"must be between 0 and {MAX_SECONDS:g} seconds")
    if not 0 < kc.resync_interval <= MAX_SECONDS:
        bad("resync_interval", f"must be > 0 and at most {MAX_SECONDS:g} seconds")
    try:
        split_listen_address(kc.listen_address)
    except ValueError as exc:
        bad("listen_address", str(exc))
    validate_enforcement(kc.enforcement, bad)
    if kc.enforcement.mode == "enforce" and kc.hook_backend not in ("auto", "lsm"):
        bad("enforcement.mode", f"enforce needs hook_backend lsm or auto, got hook_backend "
            f"{kc.hook_backend} (the fentry and tracepoint backends can only report: use mode: audit)")


# Bounds of what the kernel's policy maps hold (bpf/tapio.bpf.c).
MAX_ALLOW_HOST_CGROUPS = 128
MAX_ALLOW_PODS = 256
_POD_GLOB_RE = re.compile(r"^[a-z0-9*?\[\]-]([a-z0-9.*?\[\]-]{0,252})?$")


def validate_enforcement(en: Enforcement, bad) -> None:
    if en.mode not in ENFORCEMENT_MODES:
        bad("enforcement.mode", f"must be one of {', '.join(ENFORCEMENT_MODES)}, got {en.mode!r}")
    for kind in en.kinds:
        if kind not in ENFORCEMENT_KINDS:
            bad("enforcement.kinds", f"{kind!r} is not a volume kind; choose from "
                f"{', '.join(ENFORCEMENT_KINDS)}")
    if len(en.allow_host_cgroups) > MAX_ALLOW_HOST_CGROUPS:
        bad("enforcement.allow_host_cgroups", f"at most {MAX_ALLOW_HOST_CGROUPS} names")
    for name in en.allow_host_cgroups:
        if not name or "/" in name or "\0" in name or len(name.encode()) >= 64:
            bad("enforcement.allow_host_cgroups", f"{name!r}: expected the leaf name of a cgroup "
                "such as kubelet.service (no '/', under 64 bytes)")
    if len(en.allow_pods) > MAX_ALLOW_PODS:
        bad("enforcement.allow_pods", f"at most {MAX_ALLOW_PODS} patterns")
    for pat in en.allow_pods:
        ns, sep, name = pat.partition("/")
        if not sep or not _POD_GLOB_RE.match(ns) or not _POD_GLOB_RE.match(name):
            bad("enforcement.allow_pods", f"{pat!r}: expected namespace/name-glob such as "
                "monitoring/vault-agent-*")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")


def duration_seconds(value) -> float:
    """30, "30s", "10m", "24h", "7d", "2w" -> seconds; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 24h or 7d, got {value!r}")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        m = _DURATION.match(str(value))
        if not m:
            raise ValueError(f"expected a duration such as 30s, 10m, 24h or 7d, got {value!r}")
        seconds = float(m.group(1)) * _UNITS[m.group(2) or "s"]
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"expected a duration >= 0, got {value!r}")
    return seconds


def split_listen_address(addr: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); port 0 means pick one."""
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected host:port such as 127.0.0.1:9717, got {addr!r}")
    host = host.strip("[]")
    if not host:
        # ":9717" would bind every address: make that a choice, not a default.
        raise ValueError(f"no host in {addr!r}: write 127.0.0.1:{port} for this node only, "
                         f"or 0.0.0.0:{port} / [::]:{port} to listen on all addresses")
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IP address (use 127.0.0.1 or ::1)")
    return host, int(port)


def node_name_of(kc: KernelCollector) -> str:
    """The configured node name, else $NODE_NAME (a DaemonSet's downward-API env), else the host name."""
    return kc.node_name or os.environ.get("NODE_NAME") or socket.gethostname()


def hook_backend_of(kc: KernelCollector) -> str:
    """The hook backend to ask for: enforcing can only be done by lsm."""
    return "lsm" if kc.enforcement.mode == "enforce" else kc.hook_backend


def plugins_for(kc: KernelCollector) -> dict[str, str]:
    """Watched kubelet volume plugin dir names -> the kind of volume behind them."""
    out = {}
    if kc.monitor_configmaps:
        out[kc.configmap_volume_pattern] = "configmap"
    if kc.monitor_secrets:
        out[kc.secret_volume_pattern] = "secret"
    if kc.monitor_projected:
        out[kc.projected_volume_pattern] = "projected"
    return out


# Keys a SIGHUP reload does not apply: the daemon keeps the old value until restarted.
RESTART_KEYS = ("ring_buffer_size", "hook_backend", "pin_path", "listen_address", "syscall_sampling_rate",
                "enable_ebpf", "enable_pod_correlation", "kubelet_pods_path", "cgroup_root",
                "pod_logs_path", "kubeconfig", "node_name", "static_pods_path", "buffer_size",
                "state_path")
