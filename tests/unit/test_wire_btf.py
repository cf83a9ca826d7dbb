"""The mirrors of bpf/tapio.h checked against it, like Tetragon's
alignchecker: every TAPIO_* define against tapio_node.kernel.wire, and every
struct, field by field (offset, size, signedness), of wire's struct formats
and of _fast/wire.pxd against the BTF of both compiled objects."""
import json
import os
import re
import shutil
import struct
import subprocess

import pytest

from tapio_node.kernel import wire
from tapio_node.kernel.loader import OBJECTS, packaged_object

HEADER = os.path.join("bpf", "tapio.h")
PXD = os.path.join("_fast", "wire.pxd")

# The wire format that mirrors each struct of the header.
MIRRORS = {
    "tapio_inode_key": wire.INODE_KEY,
    "tapio_watch": wire.WATCH,
    "tapio_dev": wire.DEV,
    "tapio_overflow_key": wire.OVERFLOW_KEY,
    "tapio_pod_info": wire.POD_INFO,
    "tapio_access": wire.ACCESS,
    "tapio_access_ext": wire.ACCESS_EXT,
    "tapio_syscall": wire.SYSCALL,
    "tapio_uid": wire.UID,
    "tapio_volume_policy": wire.VOLUME_POLICY,
    "tapio_opener": wire.OPENER,
}
# wire constants without a define: pod_name[TAPIO_NAME_LEN * 4], whose
# size the POD_INFO check below compares with the BTF.
PYTHON_ONLY = {"POD_NAME_LEN"}


# -- the header -------------------------------------------------------------
@pytest.fixture(scope="module")
def header(repo_root):
    with open(os.path.join(repo_root, HEADER)) as fh:
        return fh.read()


def header_defines(text: str) -> dict[str, int]:
    out = {}
    for line in text.splitlines():
        if not re.match(r"\s*#\s*define\s+TAPIO_", line):
            continue
        m = re.match(r"\s*#\s*define\s+(TAPIO_\w+)\s+(0x[0-9a-fA-F]+|\d+)\s*(/\*.*)?$", line)
        assert m, f"{HEADER}: cannot read a number from {line.strip()!r}; keep defines literal"
        out[m[1]] = int(m[2], 0)
    return out


def header_structs(text: str) -> list[str]:
    return re.findall(r"^struct (tapio_\w+) \{", text, re.M)


def wire_constants() -> dict[str, int]:
    return {n: v for n, v in vars(wire).items() if n.isupper() and type(v) is int}


def test_every_define_has_its_twin_in_wire(header):
    defines = header_defines(header)
    assert len(defines) > 30, "the define parser found too little"
    wrong = {name: (value, getattr(wire, name[len("TAPIO_"):], "missing"))
             for name, value in defines.items()
             if getattr(wire, name[len("TAPIO_"):], None) != value}
    assert not wrong, f"define: (header, wire) {wrong}"


def test_every_wire_constant_has_its_define(header):
    defines = {name[len("TAPIO_"):] for name in header_defines(header)}
    extra = set(wire_constants()) - defines - PYTHON_ONLY
    assert not extra, f"wire constants {sorted(extra)} have no TAPIO_ define in {HEADER}"


def test_op_names_name_every_op_once(header):
    ops = {v for n, v in header_defines(header).items() if n.startswith("TAPIO_OP_")}
    assert ops and set(wire.OP_NAMES) == ops
    names = list(wire.OP_NAMES.values())
    assert all(names) and len(set(names)) == len(names)


def test_every_header_struct_is_mirrored(header):
    assert sorted(header_structs(header)) == sorted(MIRRORS)


# -- the compiled objects' BTF ----------------------------------------------
@pytest.fixture(scope="module", params=OBJECTS)
def btf(request):
    if shutil.which("bpftool") is None:
        pytest.skip("requires bpftool")
    path = packaged_object(request.param)
    try:
        out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", path],
                             capture_output=True, text=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"no compiled BPF object to read ({exc}); run make build")
    return {t["id"]: t for t in json.loads(out)["types"]}


def struct_by_name(types: dict, name: str) -> dict:
    found = [t for t in types.values() if t["kind"] == "STRUCT" and t.get("name") == name]
    assert found, f"struct {name} not in the object's BTF"
    return found[0]


def resolve(types: dict, tid: int) -> dict:
    t = types[tid]
    while t["kind"] in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
        t = types[t["type_id"]]
    return t


def scalar_kind(t: dict) -> str:
    assert t["kind"] == "INT", f"unexpected BTF kind {t['kind']}"
    if t["name"] == "char":
        return "char"
    return "signed" if t["encoding"] == "SIGNED" else "unsigned"


def array_dims(types: dict, t: dict) -> tuple[list[int], dict]:
    dims = []
    while t["kind"] == "ARRAY":
        dims.append(t["nr_elems"])
        t = resolve(types, t["type_id"])
    return dims, t


def btf_leaves(types: dict, t: dict, base: int = 0, prefix: str = ""):
    """(byte offset, size, kind, dotted name) of every scalar or char array,
    nested structs flattened: what a flat struct.Struct format describes."""
    for m in t["members"]:
        assert m["bits_offset"] % 8 == 0, f"{prefix}{m['name']} is a bitfield"
        off, name = base + m["bits_offset"] // 8, prefix + m["name"]
        mt = resolve(types, m["type_id"])
        if mt["kind"] == "STRUCT":
            yield from btf_leaves(types, mt, off, name + ".")
        elif mt["kind"] == "ARRAY":
            dims, elem = array_dims(types, mt)
            assert scalar_kind(elem) == "char", f"{name}: only char arrays are on the wire"
            n = 1
            for d in dims:
                n *= d
            yield off, n, "bytes", name
        else:
            yield off, mt["size"], scalar_kind(mt), name


_CODES = {"B": (1, "unsigned"), "b": (1, "signed"), "H": (2, "unsigned"), "h": (2, "signed"),
          "I": (4, "unsigned"), "i": (4, "signed"), "Q": (8, "unsigned"), "q": (8, "signed")}


def format_leaves(fmt: str):
    """(byte offset, size, kind) of each field of a little-endian,
    unpadded struct format."""
    assert fmt.startswith("<"), f"{fmt!r}: the wire is little-endian without padding"
    off = 0
    for count, code in re.findall(r"(\d*)(\D)", fmt[1:]):
        n = int(count or 1)
        if code == "s":
            yield off, n, "bytes"
            off += n
        elif code == "x":
            off += n
        else:
            assert code in _CODES, f"{fmt!r}: format code {code!r} not on the wire"
            size, kind = _CODES[code]
            for _ in range(n):
                yield off, size, kind
                off += size


@pytest.mark.parametrize("name", sorted(MIRRORS))
def test_wire_format_matches_btf_field_by_field(btf, name):
    t = struct_by_name(btf, name)
    pystruct = MIRRORS[name]
    theirs = list(btf_leaves(btf, t))
    ours = list(format_leaves(pystruct.format))
    assert [leaf[:3] for leaf in theirs] == ours, (
        f"{name}: BTF fields {[(n, o, s, k) for o, s, k, n in theirs]} "
        f"vs wire {pystruct.format!r} {ours}")
    assert t["size"] == pystruct.size


# -- _fast/wire.pxd ---------------------------------------------------------
_PXD_SCALARS = {"uint32_t": (4, "unsigned"), "int32_t": (4, "signed"),
                "uint64_t": (8, "unsigned"), "int64_t": (8, "signed")}


def pxd_structs(text: str) -> dict[str, list[tuple[str, str, list[str]]]]:
    """struct name -> [(member, type, [array dims])] as the .pxd declares them."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"    struct (\w+):\s*$", line)
        if m:
            cur = out[m[1]] = []
            continue
        m = re.match(r"        (\w+) (\w+)((?:\[\w+\])*)\s*$", line) if cur is not None else None
        if m:
            cur.append((m[2], m[1], re.findall(r"\[(\w+)\]", m[3])))
        elif line.strip() and cur is not None:
            raise AssertionError(f"{PXD}: cannot read {line.strip()!r}")
        else:
            cur = None
    return out


@pytest.fixture(scope="module")
def pxd(repo_root):
    with open(os.path.join(repo_root, PXD)) as fh:
        structs = pxd_structs(fh.read())
    assert {"tapio_access", "tapio_access_ext", "tapio_syscall"} <= set(structs)
    return structs


def test_pxd_structs_match_btf(btf, pxd, header):
    defines = header_defines(header)
    for sname, members in pxd.items():
        t = struct_by_name(btf, sname)
        assert [m[0] for m in members] == [m["name"] for m in t["members"]], sname
        for (mname, mtype, dims), m in zip(members, t["members"]):
            where = f"{PXD}: {sname}.{mname}"
            bt = resolve(btf, m["type_id"])
            want_dims = [defines[d] if d in defines else int(d) for d in dims]
            got_dims, bt = array_dims(btf, bt)
            assert got_dims == want_dims, f"{where}: dims {want_dims}, BTF {got_dims}"
            if mtype.startswith("tapio_"):
                assert bt["kind"] == "STRUCT" and bt["name"] == mtype, where
            elif mtype == "char":
                assert scalar_kind(bt) == "char", where
            else:
                assert mtype in _PXD_SCALARS, f"{where}: type {mtype} not on the wire"
                assert (bt["size"], scalar_kind(bt)) == _PXD_SCALARS[mtype], where


# -- the checks themselves --------------------------------------------------
def test_format_leaves_reads_nested_and_repeated_codes():
    assert list(format_leaves("<2IQ4sh")) == [(0, 4, "unsigned"), (4, 4, "unsigned"),
                                             (8, 8, "unsigned"), (16, 4, "bytes"),
                                             (20, 2, "signed")]
    assert sum(s for _, s, _ in format_leaves(wire.ACCESS_EXT.format)) == wire.ACCESS_EXT.size
    assert struct.calcsize(wire.ACCESS.format) == wire.ACCESS.size


def test_header_defines_refuse_what_they_cannot_read():
    assert header_defines("#define TAPIO_A 0x10 /* x */\n#define OTHER 1\n") == {"TAPIO_A": 16}
    with pytest.raises(AssertionError, match="cannot read"):
        header_defines("#define TAPIO_B (TAPIO_A * 4)\n")
