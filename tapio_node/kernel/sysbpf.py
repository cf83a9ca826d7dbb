"""bpf(2) without libbpf, for the probes that must answer before (or
without) loading our object: `tapio-node check` and the hook backend
chooser (kernel.backends). Each asks the kernel itself: create a map, load
a `return 0` program and attach it for an instant."""
from __future__ import annotations

import ctypes
import errno
import os
import struct

from tapio_node.kernel import compat

# bpf(2) (linux/bpf.h); x86_64 and arm64 syscall numbers.
SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(os.uname().machine, 321)
BPF_MAP_CREATE, BPF_PROG_LOAD, BPF_RAW_TRACEPOINT_OPEN = 0, 5, 17
BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_RINGBUF = 2, 27
BPF_PROG_TYPE_TRACING, BPF_PROG_TYPE_LSM = 26, 29
BPF_TRACE_FENTRY, BPF_TRACE_FEXIT, BPF_LSM_MAC = 24, 25, 27
# r0 = 0; exit
_RET0 = struct.pack("<BBhi", 0xB7, 0, 0, 0) + struct.pack("<BBhi", 0x95, 0, 0, 0)


def libc():
    return ctypes.CDLL(None, use_errno=True)


def bpf(cmd: int, attr: bytes) -> int:
    """bpf(2); returns the fd or -errno."""
    buf = ctypes.create_string_buffer(attr, len(attr))
    c = libc()
    c.syscall.restype = ctypes.c_long
    r = c.syscall(ctypes.c_long(SYS_BPF), ctypes.c_int(cmd), buf, ctypes.c_uint(len(attr)))
    if r < 0:
        return -ctypes.get_errno()
    return r


def errno_text(e: int) -> str:
    return f"{errno.errorcode.get(e, e)} ({os.strerror(e)})"


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int) -> int:
    """Create and close a map; the fd it had, or -errno."""
    attr = struct.pack("<IIIII", map_type, key_size, value_size, max_entries, 0).ljust(72, b"\0")
    fd = bpf(BPF_MAP_CREATE, attr)
    if fd >= 0:
        os.close(fd)
    return fd


def probe_attach(prog_type: int, attach_type: int, func: str, btf_path: str | None = None) -> tuple[bool, str]:
    """Load a `return 0` program for func and attach it for an instant."""
    from tapio_node.host import BTF_PATH

    try:
        btf_id = compat.Btf.load(btf_path or BTF_PATH).type_id(func, compat.BTF_KIND_FUNC)
    except (OSError, ValueError) as e:
        return False, f"cannot read BTF: {getattr(e, 'strerror', None) or e}"
    if btf_id is None:
        return False, f"{func} not in kernel BTF"
    return probe_attach_id(prog_type, attach_type, btf_id)


def probe_attach_id(prog_type: int, attach_type: int, btf_id: int) -> tuple[bool, str]:
    insns = ctypes.create_string_buffer(_RET0, len(_RET0))
    lic = ctypes.create_string_buffer(b"GPL")
    attr = bytearray(128)
    struct.pack_into("<IIQQ", attr, 0, prog_type, 2, ctypes.addressof(insns), ctypes.addressof(lic))
    attr[48:48 + 11] = b"tapio_probe"
    struct.pack_into("<I", attr, 68, attach_type)
    struct.pack_into("<I", attr, 108, btf_id)
    prog = bpf(BPF_PROG_LOAD, bytes(attr))
    if prog < 0:
        return False, f"program load refused: {errno_text(-prog)}"
    try:
        link = bpf(BPF_RAW_TRACEPOINT_OPEN, struct.pack("<QI", 0, prog).ljust(16, b"\0"))
        if link < 0:
            return False, f"attach refused: {errno_text(-link)}"
        os.close(link)   # detaches at once; the program returned 0 (no effect)
        return True, "attach allowed"
    finally:
        os.close(prog)


def lockdown() -> str | None:
    """The kernel lockdown mode (none, integrity, confidentiality), if known."""
    try:
        with open("/sys/kernel/security/lockdown", encoding="ascii") as f:
            text = f.read()
    except OSError:
        return None
    for word in text.split():
        if word.startswith("["):
            return word.strip("[]")
    return None
