"""The kernel side as one object: load, attach, pin, maps, ring buffer."""
from __future__ import annotations

import logging
import os
from importlib import resources

from tapio_node import compat, wire
from tapio_node.compat import tracefs_root

log = logging.getLogger("tapio_node.bpf")

# Correlation maps for other collectors; the watch maps for troubleshooting.
PINNED_MAPS = ("pod_info_map", "container_pids", "watched_inodes", "watched_devs", "watched_dirs")
# Programs that exist to name a tracepoint's path for the autoload check.
TRACEPOINT_OF = {
    "trace_config_access": "syscalls/sys_exit_openat",
    "trace_config_access_open": "syscalls/sys_exit_open",
    "trace_config_access_openat2": "syscalls/sys_exit_openat2",
    "trace_config_access_creat": "syscalls/sys_exit_creat",
    "trace_config_access_by_handle": "syscalls/sys_exit_open_by_handle_at",
    "trace_config_access_uring": "io_uring/io_uring_complete",
    "stash_openat": "syscalls/sys_enter_openat",
    "stash_open": "syscalls/sys_enter_open",
    "stash_openat2": "syscalls/sys_enter_openat2",
    "stash_creat": "syscalls/sys_enter_creat",
    "trace_pod_syscalls": "raw_syscalls/sys_enter",
}
CORRELATION_PROGRAMS = ("track_fork", "track_exec", "track_exit", "track_attach")


class KernelUnavailable(RuntimeError):
    """The daemon cannot use BPF here; the message says what is missing."""


def object_path(features: dict | None = None) -> str:
    """The BPF object for this kernel: tapio.bpf.o, or where the kernel has
    no bpf_rdonly_cast the same programs built without kfunc externs
    (resolving a missing one needs CAP_SYS_ADMIN; see bpf/compat.bpf.h)."""
    env = os.environ.get("TAPIO_BPF_OBJECT")
    if env:
        return env
    if features is None:
        features = compat.probe()
    name = "tapio.bpf.o" if features[compat.RDONLY_CAST].available else "tapio-nokfunc.bpf.o"
    return str(resources.files("tapio_node").joinpath("bpf", name))


def tracepoint_exists(tp: str) -> bool:
    root = tracefs_root()
    return bool(root) and os.path.isdir(os.path.join(root, "events", tp))


class Kernel:
    """Loaded and attached tapio.bpf.o, its maps and its ring buffer."""

    def __init__(self, *, ring_buffer_size: int = 4 << 20, sampling_rate: int = 0,
                 pod_correlation: bool = True, pin_path: str | None = None,
                 force_enter_stash: bool = False, max_watched_files: int | None = None):
        from tapio_node import _fast  # import here: tests of pure parts need no build

        self._fast = _fast
        self.pin_path = pin_path
        self.pinned: list[str] = []
        self.backend = "tracepoint"
        self.path_source = "pt_regs"
        self._max_watched_files = max_watched_files
        self.features = compat.probe()
        # No bpf_task_pt_regs (before 5.15): stash the path at syscall entry.
        use_stash = force_enter_stash or not self.features[compat.TASK_PT_REGS].available
        self.obj = self._load(ring_buffer_size, sampling_rate, pod_correlation, use_stash)
        if use_stash:
            self.path_source = "enter_stash"
        try:
            for name in self.obj.programs():
                if self.obj.autoload(name):
                    self.obj.attach(name)
            self.maps = {name: self.obj.map(name) for name in (
                "watched_inodes", "watched_devs", "watched_dirs", "pod_info_map",
                "container_pids", "stats", "overflow_counts", "dev_filter", "ino_filter")}
            if pin_path:
                self._pin(pin_path)
        except BaseException:
            self.close()
            raise

    def _load(self, rb_size, sampling_rate, pod_correlation, use_stash):
        obj = self._fast.BpfObject(object_path(self.features))
        obj.set_max_entries("events", rb_size)
        if self._max_watched_files:
            obj.set_max_entries("watched_inodes", self._max_watched_files)
        obj.set_u32(".rodata", "sampling_rate", sampling_rate)
        obj.set_u32(".rodata", "use_enter_stash", 1 if use_stash else 0)
        obj.set_u32(".rodata", "self_tgid", os.getpid())
        for name in obj.programs():
            tp = TRACEPOINT_OF.get(name)
            want = True
            if name.startswith("stash_"):
                want = use_stash
            elif name == "trace_pod_syscalls":
                want = sampling_rate > 0
            elif name in CORRELATION_PROGRAMS:
                want = pod_correlation
            elif name == "trace_config_access_uring":
                want = self.features[compat.URING_REQUEST].available
            if want and tp and not tracepoint_exists(tp):
                # e.g. no sys_exit_open on arm64: skip it, like libbpf-tools.
                log.info("tracepoint %s not present; %s not loaded", tp, name)
                want = False
            obj.set_autoload(name, want)
        obj.load()
        return obj

    def _pin(self, pin_path: str) -> None:
        os.makedirs(pin_path, mode=0o700, exist_ok=True)
        for name in PINNED_MAPS:
            path = os.path.join(pin_path, name)
            if os.path.exists(path):
                # A pin left by a run that did not exit cleanly.
                os.unlink(path)
            self.obj.pin(name, path)
            self.pinned.append(path)

    def features_off(self) -> list[compat.Feature]:
        """Kernel features this kernel lacks, each with what it costs."""
        return compat.missing(self.features)

    def programs(self) -> list[str]:
        return self.obj.attached()

    def reader(self, capacity: int = 8192, keep_timestamps: bool = True):
        return self._fast.RingReader(self.obj.map_fd("events"), capacity, keep_timestamps)

    def set_wakeup_bytes(self, n: int) -> None:
        self.obj.set_u32(".bss", "wakeup_bytes", n)

    def stats(self) -> dict[str, int]:
        v = self.maps["stats"].percpu_sums(wire.STAT_MAX)
        # Runs of the open programs the kernel skipped (another BPF program
        # or a BPF syscall held the CPU): opens never seen at all.
        skipped = sum(self.obj.recursion_misses(name) for name in self.obj.attached()
                      if name.startswith("trace_config_access"))
        return {"drops": v[wire.STAT_DROPS], "hits": v[wire.STAT_HITS],
                "fd_races": v[wire.STAT_FD_RACE], "syscall_drops": v[wire.STAT_SYSCALL_DROPS],
                "lost": v[wire.STAT_LOST], "skipped": skipped}

    def drain_overflow(self, everything: bool = False) -> list[tuple[int, int, int, int, int, int]]:
        """Counts of accesses the full ring buffer could not take, as
        (cgroup_id, pid, volume_id, file_id, op, count). Drains the oldest
        generation (unwritten for OVERFLOW_GENS - 1 ticks, so no program
        still counts into it), then makes it the one the kernel writes;
        everything=True (at exit) drains them all."""
        m = self.maps["overflow_counts"]
        oldest = (self.obj.get_u32(".bss", "overflow_gen") + 1) % wire.OVERFLOW_GENS
        out = []
        for key in m.keys():
            cgid, pid, vol, fid, op, gen = wire.OVERFLOW_KEY.unpack(key)
            if gen != oldest and not everything:
                continue
            raw = m.lookup(key)
            m.delete(key)
            if raw is not None:
                out.append((cgid, pid, vol, fid, op, wire.U64.unpack(raw)[0]))
        self.obj.set_u32(".bss", "overflow_gen", oldest)
        return out

    def close(self) -> None:
        obj = getattr(self, "obj", None)
        if obj is None:
            return
        for path in self.pinned:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.pinned = []
        if self.pin_path:
            try:
                os.rmdir(self.pin_path)
            except OSError:
                pass
        obj.close()
        self.obj = None


class KernelMaps:
    """The correlation maps, typed: what pods/ and other collectors use."""

    def __init__(self, kernel: Kernel):
        self._pods = kernel.maps["pod_info_map"]
        self._pids = kernel.maps["container_pids"]

    def put_pod_info(self, cgroup_id: int, info) -> None:
        from tapio_node.pods.info import pack_pod_info

        self._pods.update(wire.U64.pack(cgroup_id), pack_pod_info(info))

    def delete_pod_info(self, cgroup_id: int) -> None:
        self._pods.delete(wire.U64.pack(cgroup_id))

    def put_container_pid(self, pid: int, cgroup_id: int) -> None:
        self._pids.update(wire.U32.pack(pid), wire.U64.pack(cgroup_id))

    def delete_container_pid(self, pid: int) -> None:
        self._pids.delete(wire.U32.pack(pid))

    def pod_info_items(self) -> list[tuple[int, bytes]]:
        out = []
        for key in self._pods.keys():
            raw = self._pods.lookup(key)
            if raw is not None:
                out.append((wire.U64.unpack(key)[0], raw))
        return out

    def container_pid_items(self) -> list[tuple[int, int]]:
        out = []
        for key in self._pids.keys():
            raw = self._pids.lookup(key)
            if raw is not None:
                out.append((wire.U32.unpack(key)[0], wire.U64.unpack(raw)[0]))
        return out
