"""The records the ring-buffer reader hands out, one per folded group.

_fast.RingReader.take() builds them as Cython classes with read-only
fields; these are their pure-Python twins (wire.RecordFolder's, and the
daemon's for the kernel's overflow counts), with the same fields, kind
and equality. Times are kernel CLOCK_MONOTONIC ns."""
from __future__ import annotations

REC_ACCESS = 1
REC_SYSCALL = 2

ACCESS_FIELDS = ("pid", "tid", "cgroup_id", "comm", "dev", "gen", "ino", "volume_id", "file_id",
                 "flags", "op", "path", "dnames", "count", "first_ts", "last_ts", "stamps")
SYSCALL_FIELDS = ("pid", "tid", "cgroup_id", "comm", "nr", "count", "first_ts", "last_ts", "stamps")


class _Record:
    __slots__ = ()
    kind: int
    _fields: tuple[str, ...]

    def __init__(self, **fields):
        missing = set(self._fields) - set(fields) - {"stamps"}
        if missing or set(fields) - set(self._fields):
            raise TypeError(f"{type(self).__name__} takes {', '.join(self._fields)}")
        fields.setdefault("stamps", None)
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __eq__(self, other):
        if getattr(other, "kind", None) != self.kind or getattr(other, "_fields", None) != self._fields:
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in self._fields)

    __hash__ = None

    def __repr__(self):
        return f"{type(self).__name__}({', '.join(f'{f}={getattr(self, f)!r}' for f in self._fields)})"


class AccessRecord(_Record):
    """Identical opens of one watched file: who (pid, tid, cgroup_id, comm),
    which inode (dev, gen, ino) and watch entry (volume_id, file_id), how
    (flags, op), the path as passed and, for files matched by device or
    directory, their dentry names nearest first (dnames, else None); how
    many (count), first_ts/last_ts and each access's time (stamps, None
    unless kept)."""
    __slots__ = ACCESS_FIELDS
    kind = REC_ACCESS
    _fields = ACCESS_FIELDS


class SyscallRecord(_Record):
    """Identical sampled syscalls (nr) of one pod process."""
    __slots__ = SYSCALL_FIELDS
    kind = REC_SYSCALL
    _fields = SYSCALL_FIELDS
