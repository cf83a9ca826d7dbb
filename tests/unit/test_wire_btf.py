"""The Python mirror of bpf/tapio.h (tapio_node.kernel.wire, and through it the
Cython decoder's expectations) checked against the BTF of the compiled
object, like Tetragon's alignchecker."""
import json
import shutil
import struct
import subprocess

import pytest

from tapio_node.kernel import wire
from tapio_node.kernel.loader import object_path

pytestmark = pytest.mark.skipif(shutil.which("bpftool") is None, reason="requires bpftool")


@pytest.fixture(scope="module")
def btf_structs():
    try:
        out = subprocess.run(["bpftool", "-j", "btf", "dump", "file", object_path()],
                             capture_output=True, text=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"no compiled BPF object to read ({exc}); run make build")
    types = json.loads(out)["types"]
    return {t["name"]: t for t in types if t.get("kind") == "STRUCT"}


@pytest.mark.parametrize("name, pystruct", [
    ("tapio_inode_key", wire.INODE_KEY),
    ("tapio_watch", wire.WATCH),
    ("tapio_dev", wire.DEV),
    ("tapio_access", wire.ACCESS),
    ("tapio_access_ext", wire.ACCESS_EXT),
    ("tapio_syscall", wire.SYSCALL),
    ("tapio_pod_info", wire.POD_INFO),
])
def test_sizes_match(btf_structs, name, pystruct):
    assert name in btf_structs, f"struct {name} not in the object's BTF"
    assert btf_structs[name]["size"] == pystruct.size


def test_access_field_offsets(btf_structs):
    members = {m["name"]: m["bits_offset"] // 8 for m in btf_structs["tapio_access"]["members"]}
    expected = {"kind": 0, "flags": 4, "ts_ns": 8, "cgroup_id": 16, "pid": 24, "tid": 28,
                "key": 32, "watch": 48, "op": 56, "fd": 60, "comm": 64, "path": 80}
    assert members == expected
    # The struct module's offsets for the same fields agree.
    sizes = [struct.calcsize("<" + c) for c in ["I", "I", "Q", "Q", "I", "I", "IIQ", "II", "I", "i",
                                                f"{wire.COMM_LEN}s"]]
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    assert offsets == list(expected.values())


def test_pod_info_field_offsets(btf_structs):
    members = {m["name"]: m["bits_offset"] // 8 for m in btf_structs["tapio_pod_info"]["members"]}
    assert members["namespace"] == wire.UID_LEN
    assert members["pod_name"] == wire.UID_LEN + wire.NAME_LEN
    assert members["container_id"] == wire.UID_LEN + wire.NAME_LEN + wire.POD_NAME_LEN
    assert members["created_at"] == members["container_id"] + wire.CONTAINER_ID_LEN


def test_header_constants_match_the_mirror(repo_root):
    import os
    import re

    with open(os.path.join(repo_root, "bpf", "tapio.h")) as fh:
        defs = dict(re.findall(r"#define (TAPIO_\w+) (0x[0-9a-f]+|\d+)", fh.read()))
    value = {k: int(v, 0) for k, v in defs.items()}
    assert value["TAPIO_DEV_FILTER_SLOTS"] == wire.DEV_FILTER_SLOTS
    assert value["TAPIO_INO_FILTER_SLOTS"] == wire.INO_FILTER_SLOTS
    assert value["TAPIO_STAT_MAX"] == wire.STAT_MAX
    assert value["TAPIO_F_BY_DEV"] == wire.F_BY_DEV and value["TAPIO_F_BY_DIR"] == wire.F_BY_DIR
    assert value["TAPIO_F_UNLINKED"] == wire.F_UNLINKED
    assert value["TAPIO_F_DNAME_TRUNC"] == wire.F_DNAME_TRUNC
    assert value["TAPIO_OVERFLOW_GENS"] == wire.OVERFLOW_GENS
    assert value["TAPIO_DEV_WALK"] == wire.DEV_WALK and value["TAPIO_DEV_WHOLE"] == wire.DEV_WHOLE
    assert value["TAPIO_PATH_LEN"] == wire.PATH_LEN and value["TAPIO_COMM_LEN"] == wire.COMM_LEN
