"""The BPF object as one Kernel: load, attach, pin, map handles, ring
buffer, counters (the typed correlation maps are in kernel.maps)."""
from __future__ import annotations

import logging
import os
from importlib import resources

from tapio_node import host
from tapio_node.kernel import backends, compat, policy, wire

log = logging.getLogger("tapio_node.kernel")

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
# Programs that report accesses (recursion misses of these are lost opens).
ACCESS_PROGRAMS = (*(n for n in TRACEPOINT_OF if n.startswith("trace_config_access")),
                   *backends.HOOK_PROGRAMS.values())
# Opened once after a hook attaches: the hook must be seen to run on it.
HOOK_PROOF_FILE = "/proc/self/stat"
# The object built from bpf/tapio.bpf.c, and the same without kfuncs.
OBJECTS = ("tapio.bpf.o", "tapio-nokfunc.bpf.o")


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
    return packaged_object(OBJECTS[0] if features[compat.RDONLY_CAST].available else OBJECTS[1])


def packaged_object(name: str) -> str:
    """Where setup.py's build_bpf put one of OBJECTS."""
    return str(resources.files("tapio_node.kernel").joinpath("obj", name))


def tracepoint_exists(tp: str) -> bool:
    root = host.tracefs_root()
    return bool(root) and os.path.isdir(os.path.join(root, "events", tp))


class Kernel:
    """Loaded and attached tapio.bpf.o, its maps and its ring buffer."""

    def __init__(self, *, ring_buffer_size: int = 4 << 20, sampling_rate: int = 0,
                 pod_correlation: bool = True, pin_path: str | None = None,
                 force_enter_stash: bool = False, max_watched_files: int | None = None,
                 hook_backend: str = "auto"):
        from tapio_node import _fast  # import here: tests of pure parts need no build

        self._fast = _fast
        self.pin_path = pin_path
        self.pinned: list[str] = []
        self.obj = None
        self.backend = "none"
        self.path_source = "pt_regs"
        self._max_watched_files = max_watched_files
        self.features = compat.probe()
        # No bpf_task_pt_regs (before 5.15): stash the path at syscall entry
        # (tracepoint backend only: the hook backends need pt_regs anyway).
        use_stash = force_enter_stash or not self.features[compat.TASK_PT_REGS].available
        self.availability = backends.probe(self.features)
        if force_enter_stash and hook_backend == "auto":
            hook_backend = backends.TRACEPOINT
        try:
            want = backends.candidates(hook_backend, self.availability)
        except backends.BackendUnavailable as exc:
            raise KernelUnavailable(str(exc)) from None
        # Why each better backend was passed over, for the log and check.
        self.passed_over = {b: a.why for b, a in self.availability.items()
                            if not a.ok and backends.ORDER.index(b) < backends.ORDER.index(want[0])}
        load = (ring_buffer_size, sampling_rate, pod_correlation)
        try:
            hooks = [b for b in want if b != backends.TRACEPOINT]
            if hooks:
                self._start_hook(hooks, load)
            if self.obj is None:
                if backends.TRACEPOINT not in want:
                    raise KernelUnavailable(
                        f"hook_backend {hook_backend} cannot attach: {self.passed_over[hook_backend]}")
                self.obj = self._load(*load, use_stash=use_stash, hooks=())
                self._attach_autoloaded()
                self.backend = backends.TRACEPOINT
                if use_stash:
                    self.path_source = "enter_stash"
            self.maps = {name: self.obj.map(name) for name in (
                "watched_inodes", "watched_devs", "watched_dirs", "pod_info_map",
                "container_pids", "stats", "overflow_counts", "dev_filter", "ino_filter",
                *policy.MAPS)}
            self.policy = policy.KernelPolicy(self)
            if pin_path:
                self._pin(pin_path)
        except BaseException:
            self.close()
            raise
        finally:
            # The kernel's BTF (~8 MB read into memory) was needed to choose
            # the programs and backend only: a long-running daemon keeps none of it.
            compat.Btf.load.cache_clear()

    def _start_hook(self, hooks: list[str], load: tuple) -> None:
        """Load once with the hook program of every candidate, keep the
        first that attaches and is seen to run; self.obj stays None if none does."""
        try:
            obj = self._load(*load, use_stash=False, hooks=hooks)
        except self._fast.BpfError as exc:
            for b in hooks:
                self.passed_over[b] = f"load failed: {exc}"
            log.warning("loading the %s backend failed, falling back: %s", "/".join(hooks), exc)
            return
        self.obj = obj
        try:
            self._attach_autoloaded(skip=backends.HOOK_PROGRAMS.values())
            for b in hooks:
                why = self._attach_proved(backends.HOOK_PROGRAMS[b])
                if why is None:
                    self.backend = b
                    return
                self.passed_over[b] = why
                log.info("hook backend %s not used: %s", b, why)
        except BaseException:
            self.close()
            raise
        self.close()

    def _attach_autoloaded(self, skip=()) -> None:
        for name in self.obj.programs():
            if self.obj.autoload(name) and name not in skip:
                self.obj.attach(name)

    def _attach_proved(self, prog: str) -> str | None:
        """Attach prog and see it run on an open of ours; None when it does,
        else why not (and prog is detached again)."""
        try:
            self.obj.attach(prog)
        except self._fast.BpfError as exc:
            return f"attach failed: {exc}"
        before = self._stat_sums()[wire.STAT_PROBE]
        self.obj.set_u32(".bss", "probe_tgid", os.getpid())
        try:
            os.close(os.open(HOOK_PROOF_FILE, os.O_RDONLY))
        finally:
            self.obj.set_u32(".bss", "probe_tgid", 0)
        if self._stat_sums()[wire.STAT_PROBE] > before:
            return None
        self.obj.detach(prog)
        if prog == backends.HOOK_PROGRAMS[backends.LSM]:
            return "attached, but the hook never ran: bpf is not an active LSM (" + backends.ENABLE_LSM + ")"
        return "attached, but the hook never ran"

    def _stat_sums(self) -> list[int]:
        """The per-CPU stats map summed, one value per TAPIO_STAT_* index."""
        return self.obj.map("stats").percpu_sums(wire.STAT_MAX)

    def _load(self, rb_size, sampling_rate, pod_correlation, *, use_stash: bool, hooks) -> object:
        obj = self._fast.BpfObject(object_path(self.features))
        obj.set_max_entries("events", rb_size)
        if self._max_watched_files:
            obj.set_max_entries("watched_inodes", self._max_watched_files)
        obj.set_u32(".rodata", "sampling_rate", sampling_rate)
        obj.set_u32(".rodata", "use_enter_stash", 1 if use_stash else 0)
        obj.set_u32(".rodata", "self_tgid", os.getpid())
        hook_programs = {backends.HOOK_PROGRAMS[b] for b in hooks}
        for name in obj.programs():
            tp = TRACEPOINT_OF.get(name)
            want = True
            if name in backends.HOOK_PROGRAMS.values():
                want = name in hook_programs
            elif name.startswith("trace_config_access") or name.startswith("stash_"):
                # The tracepoint backend's programs; never beside a hook.
                want = not hooks and (use_stash or not name.startswith("stash_"))
                if name == "trace_config_access_uring":
                    want = want and self.features[compat.URING_REQUEST].available
            elif name == "trace_pod_syscalls":
                want = sampling_rate > 0
            elif name in CORRELATION_PROGRAMS:
                want = pod_correlation
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
        """Kernel features this kernel lacks, each with what it costs. They
        matter to the tracepoint backend only: a hook backend reads its
        struct file directly and sees io_uring opens itself."""
        if self.backend in backends.HOOK_PROGRAMS:
            return []
        return compat.missing(self.features)

    def programs(self) -> list[str]:
        return self.obj.attached()

    def reader(self, capacity: int = 8192, keep_timestamps: bool = True):
        return self._fast.RingReader(self.obj.map_fd("events"), capacity, keep_timestamps)

    def set_wakeup_bytes(self, n: int) -> None:
        self.obj.set_u32(".bss", "wakeup_bytes", n)

    def stats(self) -> dict[str, int]:
        v = self._stat_sums()
        # Runs of the open programs the kernel skipped (another BPF program
        # or a BPF syscall held the CPU): opens never seen at all.
        skipped = sum(self.obj.recursion_misses(name) for name in self.obj.attached()
                      if name in ACCESS_PROGRAMS)
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

