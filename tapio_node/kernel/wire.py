"""The wire structs of bpf/tapio.h in Python: its constants, packers for
map keys and values, and the pure-Python twin of the Cython record folder.
tests/unit/test_wire_btf.py checks every constant against the header and
every struct against the compiled object's BTF.

RecordFolder.take() and _fast.RingReader.take() hand out equal records
(tapio_node.kernel.records): AccessRecord and SyscallRecord.
"""
from __future__ import annotations

import struct

from tapio_node.kernel.records import AccessRecord, SyscallRecord

COMM_LEN = 16
PATH_LEN = 256
DNAME_LEN = 64
DNAMES = 4
UID_LEN = 40
NAME_LEN = 64
POD_NAME_LEN = NAME_LEN * 4
CONTAINER_ID_LEN = 72

REC_ACCESS = 1
REC_SYSCALL = 2

F_PATH_TRUNC = 0x1
F_PATH_FAULT = 0x2
F_BY_DEV = 0x4
F_BY_DIR = 0x8
F_UNLINKED = 0x10
F_DNAME_TRUNC = 0x20
F_POLICY_ALLOWED = 0x40
F_POLICY_WOULD_DENY = 0x80
F_POLICY_DENIED = 0x100
F_POLICY_MASK = F_POLICY_ALLOWED | F_POLICY_WOULD_DENY | F_POLICY_DENIED
# The event's "policy" for each verdict flag.
POLICY_NAMES = {F_POLICY_ALLOWED: "allowed", F_POLICY_WOULD_DENY: "would_deny",
                F_POLICY_DENIED: "denied"}

OP_OPENAT = 0
OP_OPEN = 1
OP_OPENAT2 = 2
OP_CREAT = 3
OP_OPEN_BY_HANDLE = 4
OP_URING_OPENAT = 5
OP_URING_OPENAT2 = 6
OP_EXEC = 7
OP_URING = 8
OP_OTHER = 9
# What an event's "syscall" says for each op.
OP_NAMES = {OP_OPENAT: "openat", OP_OPEN: "open", OP_OPENAT2: "openat2", OP_CREAT: "creat",
            OP_OPEN_BY_HANDLE: "open_by_handle_at", OP_URING_OPENAT: "io_uring_openat",
            OP_URING_OPENAT2: "io_uring_openat2", OP_EXEC: "exec", OP_URING: "io_uring",
            OP_OTHER: "other"}

DEV_USE_GEN = 0x1
DEV_WHOLE = 0x2
DEV_WALK = 0x4

DEV_FILTER_SLOTS = 1024
INO_FILTER_SLOTS = 65536

POLICY_OFF = 0
POLICY_AUDIT = 1
POLICY_ENFORCE = 2
VOL_PROTECTED = 0x1
OPENER_POD = 0x1
OPENER_UNKNOWN = 0x2
CGROUP_DEPTH = 16
CGROUP_NAME_LEN = 128

STAT_DROPS = 0
STAT_HITS = 1
STAT_FD_RACE = 2
STAT_SYSCALL_DROPS = 3
STAT_LOST = 4
STAT_PROBE = 5
STAT_MAX = 6

INODE_KEY = struct.Struct("<IIQ")          # dev, gen, ino
WATCH = struct.Struct("<II")               # volume_id, file_id
DEV = struct.Struct("<II")                 # flags, volume_id
OVERFLOW_KEY = struct.Struct("<QIIIHH")   # cgroup_id, pid, volume_id, file_id, op, gen
OVERFLOW_GENS = 8
OVERFLOW_OP_MASK = 0xff


def split_overflow_op(op: int) -> tuple[int, int]:
    """An overflow key's op -> (TAPIO_OP_*, the verdict flags)."""
    return op & OVERFLOW_OP_MASK, (op & ~OVERFLOW_OP_MASK) >> 2
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
ACCESS = struct.Struct(f"<IIQQIIIIQIIIi{COMM_LEN}s{PATH_LEN}s")
ACCESS_EXT = struct.Struct(ACCESS.format + f"{DNAME_LEN * DNAMES}s")
SYSCALL = struct.Struct(f"<IIQQII{COMM_LEN}s")
POD_INFO = struct.Struct(
    f"<{UID_LEN}s{NAME_LEN}s{POD_NAME_LEN}s{CONTAINER_ID_LEN}sqII")
UID = struct.Struct(f"<{UID_LEN}s")
VOLUME_POLICY = struct.Struct(f"<{UID_LEN}sI")             # owner, flags
OPENER = struct.Struct(f"<{UID_LEN}sI{NAME_LEN}s")        # pod, flags, leaf


def pack_inode_key(dev: int, gen: int, ino: int) -> bytes:
    """A watched_inodes key; _fast.stat_inode_key gives the numbers."""
    return INODE_KEY.pack(dev, gen, ino)


def watch_value(volume_id: int, file_id: int) -> bytes:
    return WATCH.pack(volume_id, file_id)


def dev_value(flags: int, volume_id: int) -> bytes:
    return DEV.pack(flags, volume_id)


def _fixed(text: str | None, size: int, field: str) -> bytes:
    raw = (text or "").encode()
    if len(raw) >= size:
        raise ValueError(f"{field} is {len(raw)} bytes; at most {size - 1} fit")
    return raw


def pack_pod_info(pod_uid: str, namespace: str | None, pod_name: str | None,
                  container_id: str | None, created_at: int, qos: int) -> bytes:
    return POD_INFO.pack(
        _fixed(pod_uid, UID_LEN, "pod_uid"),
        _fixed(namespace, NAME_LEN, "namespace"),
        _fixed(pod_name, POD_NAME_LEN, "pod_name"),
        _fixed(container_id, CONTAINER_ID_LEN, "container_id"),
        created_at, qos, 0)


def unpack_pod_info(raw: bytes) -> tuple[str, str, str, str, int, int]:
    uid, ns, name, cid, created, qos, _flags = POD_INFO.unpack(raw)
    return (_cstr(uid), _cstr(ns), _cstr(name), _cstr(cid), created, qos)


def pack_uid(pod_uid: str) -> bytes:
    """A pod UID as the kernel's cgroup walk writes it: '-' separated."""
    return UID.pack(_fixed(pod_uid.replace("_", "-"), UID_LEN, "pod_uid"))


def volume_policy_value(owner_uid: str, protected: bool) -> bytes:
    return VOLUME_POLICY.pack(pack_uid(owner_uid), VOL_PROTECTED if protected else 0)


def host_allow_key(leaf: str) -> bytes:
    """A policy_host_allow key: a cgroup leaf name, NUL padded."""
    return _fixed(leaf, NAME_LEN, "cgroup name").ljust(NAME_LEN, b"\0")


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "backslashreplace")


def pack_access(*, pid: int, tid: int, cgroup_id: int, dev: int, gen: int,
                ino: int, volume_id: int, file_id: int, ts_ns: int,
                comm: bytes = b"", path: bytes = b"", flags: int = 0,
                op: int = 0, fd: int = 3,
                dnames: tuple[bytes, ...] | None = None) -> bytes:
    """A record as the kernel writes it (tests and the decoder twin)."""
    base = ACCESS.pack(REC_ACCESS, flags, ts_ns, cgroup_id, pid, tid, dev, gen,
                       ino, volume_id, file_id, op, fd, comm, path)
    if dnames is None:
        return base
    return base + b"".join(n.ljust(DNAME_LEN, b"\0")[:DNAME_LEN] for n in dnames)


def pack_syscall(*, pid: int, tid: int, cgroup_id: int, nr: int, ts_ns: int,
                 comm: bytes = b"") -> bytes:
    return SYSCALL.pack(REC_SYSCALL, nr, ts_ns, cgroup_id, pid, tid, comm)


class RecordFolder:
    """Pure-Python twin of _fast.RingReader's fold/take (no ring buffer)."""

    def __init__(self, capacity: int = 8192, keep_timestamps: bool = True, max_groups: int = 1024):
        self.capacity = capacity
        self.max_groups = min(capacity, max_groups)
        self.keep_timestamps = keep_timestamps
        self.bad_records = 0
        self._reset()

    def _reset(self):
        self._groups: list[list] = []
        self._index: dict[tuple, int] = {}
        self._nrec = 0

    @property
    def full(self) -> bool:
        return self._nrec >= self.capacity or len(self._groups) >= self.max_groups

    @property
    def pending(self) -> int:
        return self._nrec

    def feed(self, records) -> int:
        added = 0
        for raw in records:
            if self.full:
                break
            self._add(raw)
            added += 1
        return added

    def _add(self, raw: bytes) -> None:
        if len(raw) < 8:
            self.bad_records += 1
            return
        kind = U32.unpack_from(raw)[0]
        if kind == REC_ACCESS:
            if len(raw) < ACCESS.size:
                self.bad_records += 1
                return
            f = ACCESS.unpack_from(raw)
            flags = f[1]
            dnames = None
            if flags & (F_BY_DEV | F_BY_DIR):
                if len(raw) < ACCESS_EXT.size:
                    self.bad_records += 1
                    return
                blob = raw[ACCESS.size:ACCESS_EXT.size]
                dnames = tuple(_cstr(blob[i * DNAME_LEN:(i + 1) * DNAME_LEN])
                               for i in range(DNAMES))
            (_, flags, ts, cgid, pid, tid, dev, gen, ino, vol, fid, op, _fd,
             comm, path) = f
            comm_s, path_s = _cstr(comm), _cstr(path)
            head = (REC_ACCESS, pid, tid, cgid, comm_s, dev, gen, ino, vol, fid,
                    flags, op, path_s, dnames)
            key = None if dnames is not None else (
                REC_ACCESS, pid, cgid, comm_s, dev, gen, ino, vol, fid, flags,
                op, path_s)
        elif kind == REC_SYSCALL:
            if len(raw) < SYSCALL.size:
                self.bad_records += 1
                return
            _, nr, ts, cgid, pid, tid, comm = SYSCALL.unpack_from(raw)
            comm_s = _cstr(comm)
            head = (REC_SYSCALL, pid, tid, cgid, comm_s, nr)
            key = (REC_SYSCALL, pid, cgid, nr, comm_s)
        else:
            self.bad_records += 1
            return
        gi = self._index.get(key) if key is not None else None
        if gi is None:
            gi = len(self._groups)
            self._groups.append([head, 0, ts, ts, []])
            if key is not None:
                self._index[key] = gi
        g = self._groups[gi]
        g[1] += 1
        g[3] = max(g[3], ts)
        g[4].append(ts)
        self._nrec += 1

    def take(self) -> list[AccessRecord | SyscallRecord]:
        out = []
        for head, count, first, last, stamps in self._groups:
            make, fields = ((AccessRecord, AccessRecord._fields) if head[0] == REC_ACCESS
                            else (SyscallRecord, SyscallRecord._fields))
            out.append(make(**dict(zip(fields, head[1:] + (
                count, first, last, stamps if self.keep_timestamps else None)))))
        self._reset()
        return out
