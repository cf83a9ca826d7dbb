"""What this kernel can do for the BPF side, and what each missing piece costs.

The mirror of bpf/compat.bpf.h: the BPF object tests the same facts with
CO-RE (helper ids in `enum bpf_func_id`, the `bpf_rdonly_cast` kfunc, the
io_uring tracepoint's fields), so it loads on every kernel; this module
asks the kernel the same questions to choose what to load and to say what
is off in `tapio-node check`, `/healthz` and the start-up log. It probes
the kernel's own BTF and tracefs, never a version number.
"""
from __future__ import annotations

import functools
import os
import struct

import msgspec

from tapio_node.host import BTF_PATH, tracefs_root

BTF_KIND_ENUM, BTF_KIND_TYPEDEF, BTF_KIND_FUNC, BTF_KIND_ENUM64 = 6, 8, 12, 19


class Feature(msgspec.Struct, frozen=True, kw_only=True):
    name: str          # what the kernel lacks or has, as the kernel names it
    available: bool
    since: str         # first upstream kernel with it
    uses: str          # what the daemon does with it
    off: str = ""      # what it does without it, and what that costs

    def describe(self) -> str:
        if self.available:
            return f"{self.name}: yes ({self.uses})"
        return f"{self.name}: no, needs {self.since} ({self.off})"


class Btf:
    """The few look-ups we need in a kernel's BTF (a small walk, no libbpf)."""

    # Bytes after the 12-byte common header: fixed, and per member (vlen).
    _FIXED = {1: 4, 3: 12, 14: 4, 17: 4}
    _PER_VLEN = {4: 12, 5: 12, 6: 8, 13: 8, 15: 12, 19: 12}

    def __init__(self, data: bytes):
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = \
            struct.unpack_from("<HBBIIIII", data)
        if magic != 0xEB9F:
            raise ValueError("not BTF (bad magic)")
        self._data = data
        self._strings = data[hdr_len + str_off: hdr_len + str_off + str_len]
        self._types = (hdr_len + type_off, hdr_len + type_off + type_len)

    @classmethod
    @functools.lru_cache(maxsize=4)
    def load(cls, path: str = BTF_PATH) -> "Btf":
        with open(path, "rb") as f:
            return cls(f.read())

    def _name_off(self, name: str) -> int | None:
        pos = self._strings.find(b"\0" + name.encode() + b"\0")
        return None if pos < 0 else pos + 1

    def _walk(self):
        """(type id, kind, name offset, vlen, offset of the members)."""
        off, end = self._types
        tid = 1
        while off < end:
            name_off, info = struct.unpack_from("<II", self._data, off)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            members = off + 12 + self._FIXED.get(kind, 0)
            yield tid, kind, name_off, vlen, members
            off = members + self._PER_VLEN.get(kind, 0) * vlen
            tid += 1

    def type_id(self, name: str, kind: int) -> int | None:
        want = self._name_off(name)
        if want is None:
            return None
        for tid, k, name_off, _vlen, _members in self._walk():
            if k == kind and name_off == want:
                return tid
        return None

    def enum_has(self, enum: str, value: str) -> bool:
        want, wanted_value = self._name_off(enum), self._name_off(value)
        if want is None or wanted_value is None:
            return False
        for _tid, k, name_off, vlen, members in self._walk():
            if k in (BTF_KIND_ENUM, BTF_KIND_ENUM64) and name_off == want:
                size = self._PER_VLEN[k]
                return any(struct.unpack_from("<I", self._data, members + i * size)[0] == wanted_value
                           for i in range(vlen))
        return False


def tracepoint_fields(tp: str) -> list[str] | None:
    """Field names of a tracepoint's record, or None if it does not exist."""
    root = tracefs_root()
    if not root:
        return None
    try:
        with open(os.path.join(root, "events", tp, "format"), encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("field:"):
            decl = line[len("field:"):].split(";", 1)[0]
            out.append(decl.split()[-1].split("[", 1)[0].lstrip("*"))
    return out


RDONLY_CAST = "bpf_rdonly_cast"
TASK_BTF = "bpf_get_current_task_btf"
TASK_PT_REGS = "bpf_task_pt_regs"
URING_REQUEST = "io_uring_complete.req"


def probe(btf_path: str = BTF_PATH) -> dict[str, Feature]:
    """The kernel features the BPF side adapts to, by name."""
    try:
        btf = Btf.load(btf_path)
    except (OSError, ValueError):
        btf = None

    def helper(name: str) -> bool:
        return bool(btf) and btf.enum_has("bpf_func_id", "BPF_FUNC_" + name[len("bpf_"):])

    uring = tracepoint_fields("io_uring/io_uring_complete")
    features = [
        Feature(name=RDONLY_CAST, since="6.2",
                available=bool(btf) and btf.type_id(RDONLY_CAST, BTF_KIND_FUNC) is not None,
                uses="file and inode fields read with direct loads",
                off="each file field read by bpf_probe_read_kernel: a helper call per field, "
                    "a little more CPU per open on a watched device"),
        Feature(name=TASK_BTF, since="5.11", available=helper(TASK_BTF),
                uses="the fd table read with direct loads",
                off="the fd table read by bpf_probe_read_kernel: a little more CPU per open"),
        Feature(name=TASK_PT_REGS, since="5.15", available=helper(TASK_PT_REGS),
                uses="the path argument read at syscall exit, one tracepoint per open",
                off="the path argument stashed at syscall entry: four more tracepoints "
                    "(sys_enter_open*), a map update per open"),
        Feature(name=URING_REQUEST, since="5.18",
                available=uring is not None and "req" in uring,
                uses="io_uring IORING_OP_OPENAT/OPENAT2 opens reported",
                off="io_uring opens are not seen ("
                    + ("no io_uring tracepoint" if uring is None
                       else "its completion record carries no request, so no opcode")
                    + "); syscall opens are"),
    ]
    return {f.name: f for f in features}


def missing(features: dict[str, Feature]) -> list[Feature]:
    return [f for f in features.values() if not f.available]
