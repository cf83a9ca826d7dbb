"""host: the mountinfo parser (Cython and Python, side by side), cgroup v2
and tracefs roots, device numbers."""
import os
import random

import pytest

from tapio_node import host

try:
    from tapio_node import _fast
except ImportError:  # not built: only the Python twin is tested
    _fast = None

PARSERS = [pytest.param(host._py_parse_mountinfo, id="python")]
if _fast is not None:
    PARSERS.append(pytest.param(_fast.parse_mountinfo, id="fast"))

SAMPLE = (b"36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n"
          b"25 1 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw\n")


def both(data: bytes):
    """Both parsers' answer, checked equal."""
    py = host._py_parse_mountinfo(data)
    if _fast is not None:
        assert _fast.parse_mountinfo(data) == py
    return py


@pytest.mark.parametrize("parse", PARSERS)
def test_proc5_example(parse):
    got = parse(SAMPLE)
    assert got[0] == (36, 35, 98 << 20, "/mnt1", "/mnt/parent", "rw,noatime", ("master:1",),
                      "ext3", "/dev/root", "rw,errors=continue")
    assert got[1][4] == "/sys/fs/cgroup" and got[1][6] == ("shared:9",) and got[1][7] == "cgroup2"


@pytest.mark.parametrize("parse", PARSERS)
def test_escapes(parse):
    line = (rb"40 1 0:50 /a\134b /var/lib/kubelet/pods/x/volumes/my\040dir\011tab\012nl rw - "
            rb"tmpfs my\040src rw,size=1k")
    (m,) = parse(line)
    assert m[3] == "/a\\b"
    assert m[4] == "/var/lib/kubelet/pods/x/volumes/my dir\ttab\nnl"
    assert m[8] == "my src"


@pytest.mark.parametrize("parse", PARSERS)
def test_escape_edges(parse):
    # Not an escape: too short, a digit over 7, a value over 0377, a trailing backslash.
    line = rb"1 1 0:1 / /x\04 rw - t \408\040\400 \777\ "
    (m,) = parse(line + b"\n")
    assert m[4] == "/x\\04" and m[8] == "\\408 \\400" and m[9] == "\\777\\"
    # Escaped bytes that are not UTF-8 decode as os.fsdecode does.
    (m,) = parse(rb"1 1 0:1 / /\377\376 rw - t s o")
    assert m[4] == os.fsdecode(b"/\xff\xfe") and os.fsencode(m[4]) == b"/\xff\xfe"
    (m,) = parse("1 1 0:1 / /caf\u00e9 rw - t s o".encode())
    assert m[4] == "/caf\u00e9"


@pytest.mark.parametrize("parse", PARSERS)
def test_optional_fields_and_separator(parse):
    none = b"1 0 8:1 / / rw - ext4 /dev/sda1 rw"
    many = b"2 1 0:5 / /a rw shared:1 master:2 propagate_from:3 unbindable - tmpfs tmpfs rw"
    # A "-" before the sixth field is not the separator; " - " inside an
    # escaped name is not one either.
    dash = rb"3 1 0:6 / /b\040-\040c - shared:4 - tmpfs - rw"
    got = parse(b"\n".join([none, many, dash]))
    assert got[0][6] == () and got[0][7] == "ext4"
    assert got[1][6] == ("shared:1", "master:2", "propagate_from:3", "unbindable")
    assert got[2][4] == "/b - c" and got[2][5] == "-" and got[2][6] == ("shared:4",)
    assert got[2][7:] == ("tmpfs", "-", "rw")


@pytest.mark.parametrize("parse", PARSERS)
def test_empty_source_and_long_lines(parse):
    (m,) = parse(b"5 1 0:7 / /e rw - tmpfs  rw")   # an empty source
    assert m[7:] == ("tmpfs", "", "rw")
    point = "/" + "/".join(["d" * 200] * 40)
    opts = ",".join(f"o{i}" for i in range(2000))
    (m,) = parse(f"6 1 0:8 / {point} rw - tmpfs tmpfs {opts}".encode())
    assert m[4] == point and m[9] == opts


@pytest.mark.parametrize("parse", PARSERS)
def test_malformed_lines_left_out(parse):
    bad = [b"", b"garbage", b"1 1 0:1 / /x rw tmpfs tmpfs rw",   # no separator
           b"1 1 0:1 / /x rw - tmpfs tmpfs",                        # no super options
           b"x 1 0:1 / /x rw - tmpfs tmpfs rw", b"1 1 01 / /x rw - t s o",
           b"1 1 0:1:2 / /x rw - t s o", b"1 1 :1 / /x rw - t s o",
           b"12345678901 1 0:1 / /x rw - t s o", b"1 1 0:x / /x rw - t s o",
           b"1 1 0:1 / /x - t s o"]                                  # "-" as options: too early
    good = b"7 1 0:9 / /ok rw - tmpfs tmpfs rw"
    got = parse(b"\n".join(bad + [good, b""]))
    assert [m[4] for m in got] == ["/ok"]


def test_twins_agree_on_real_mountinfo():
    data = host.read_proc(host.MOUNTINFO)
    got = both(data)
    assert len(got) == data.count(b"\n")
    assert any(m[4] == "/" for m in got)
    st = os.stat("/proc")
    assert any(m[4] == "/proc" and m[2] == host.kernel_dev(st.st_dev) for m in got)


def test_twins_agree_on_noise():
    rng = random.Random(7)
    parsed = 0
    alphabet = b" -:\\01234567890abc/\t\xff\n"
    for _ in range(3000):
        words = [bytes(rng.choice(alphabet) for _ in range(rng.randint(0, 6)))
                 for _ in range(rng.randint(0, 14))]
        if rng.random() < 0.5 and len(words) > 7:
            words[:3] = [b"1", b"2", b"3:4"]
            words[rng.randint(6, len(words) - 1)] = b"-"
        parsed += len(both(b" ".join(words)))
    assert parsed > 50   # the noise reaches past the line checks


def test_mounts_and_helpers(tmp_path):
    table = host.mounts()
    assert table and isinstance(table[0], host.Mount)
    assert table[0] == tuple(host._py_parse_mountinfo(host.read_proc(host.MOUNTINFO))[0])
    assert host.mounts(str(tmp_path / "missing")) == []
    fake = [host.Mount(1, 0, 1, "/", "/", "rw", (), "ext4", "/dev/sda", "rw"),
            host.Mount(2, 1, 2, "/", "/sys/fs/cgroup/unified", "rw", (), "cgroup2", "c", "rw"),
            host.Mount(3, 1, 3, "/", "/srv/a b", "rw", (), "tmpfs", "t", "rw"),
            host.Mount(4, 3, 4, "/", "/srv/a b", "rw", (), "bpf", "b", "rw"),
            host.Mount(5, 4, 5, "/", "/srv/a b/c", "rw", (), "tmpfs", "t", "rw")]
    assert host.cgroup2_root(fake) == "/sys/fs/cgroup/unified"
    assert host.cgroup2_root(fake[:1]) is None
    assert host.fs_type_at("/srv/a b/x", fake) == "bpf"        # mounted over the tmpfs
    assert host.fs_type_at("/srv/a bc", fake) == "ext4"
    assert host.fs_type_at("/srv/a b/c/d", fake) == "tmpfs"
    assert host.mounts_under("/srv/a b", fake) == ["/srv/a b", "/srv/a b", "/srv/a b/c"]
    assert host.mounts_under("/", fake[:2]) == ["/", "/sys/fs/cgroup/unified"]


def test_cgroup_root_setting():
    assert host.cgroup_root("/custom") == "/custom"
    assert host.cgroup_root("auto") == host.cgroup2_root()


def test_kernel_dev():
    assert host.kernel_dev(os.makedev(8, 1)) == 8 << 20 | 1
    assert host.kernel_dev(os.makedev(259, 1 << 19)) == 259 << 20 | 1 << 19
    if _fast is not None:  # stat_inode_key's own encoding is the same
        assert _fast.stat_inode_key("/proc")[0] == host.kernel_dev(os.lstat("/proc").st_dev)


def test_proc_readers():
    assert host.proc_comm(os.getpid())
    assert host.proc_comm(2**22 + 5) == ""
    assert host.proc_cgroup(os.getpid())
    assert host.cap_eff() >= 0
