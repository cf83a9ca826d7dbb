"""The record folder: Cython (c-decoder) and its pure-Python twin
(py-decoder) must produce the same groups from the same records."""
import pytest

from tapio_node.kernel import records, wire

try:
    from tapio_node import _fast
    from tapio_node._fast import RingReader
except ImportError:  # pragma: no cover
    RingReader = _fast = None


def c_folder(capacity=8192, keep_timestamps=True, max_groups=1024):
    return RingReader(-1, capacity, keep_timestamps, max_groups)


FOLDERS = [pytest.param(wire.RecordFolder, id="py-decoder"),
           pytest.param(c_folder, id="c-decoder",
                        marks=pytest.mark.skipif(RingReader is None, reason="extension not built"))]


def rec(pid=10, ts=1, path=b"/run/secrets/x/key", file_id=5, flags=0, **kw):
    args = dict(pid=pid, tid=pid, cgroup_id=77, dev=0x800001, gen=42, ino=1234, volume_id=3,
                file_id=file_id, ts_ns=ts, comm=b"cat", path=path, flags=flags)
    args.update(kw)
    return wire.pack_access(**args)


@pytest.mark.parametrize("make", FOLDERS)
def test_identical_accesses_fold_with_every_timestamp(make):
    f = make()
    f.feed([rec(ts=t) for t in (5, 6, 7)] + [rec(pid=11, ts=8), rec(ts=9)])
    groups = f.take()
    assert len(groups) == 2
    g = groups[0]
    assert g.kind == wire.REC_ACCESS
    assert (g.pid, g.tid, g.cgroup_id, g.comm, g.dev, g.gen, g.ino, g.volume_id, g.file_id,
            g.flags, g.op, g.path, g.dnames) == (10, 10, 77, "cat", 0x800001, 42, 1234, 3, 5, 0, 0,
                                                 "/run/secrets/x/key", None)
    assert (g.count, g.first_ts, g.last_ts) == (4, 5, 9)
    assert g.stamps == [5, 6, 7, 9]
    assert groups[1].pid == 11 and groups[1].count == 1 and groups[1].stamps == [8]
    with pytest.raises(AttributeError):
        g.pid = 1
    assert f.take() == []


@pytest.mark.parametrize("make", FOLDERS)
def test_different_paths_do_not_fold(make):
    f = make()
    f.feed([rec(path=b"a"), rec(path=b"ab"), rec(path=b"a")])
    assert [(g.path, g.count) for g in f.take()] == [("a", 2), ("ab", 1)]


@pytest.mark.parametrize("make", FOLDERS)
def test_fallback_records_carry_names_and_never_fold(make):
    names = (b"tls.key", b"..2026_11_25_10_00_00.1", b"/", b"/")
    f = make()
    f.feed([rec(file_id=0, flags=wire.F_BY_DEV, dnames=names, ts=t) for t in (1, 2)])
    groups = f.take()
    assert len(groups) == 2
    assert groups[0].dnames == ("tls.key", "..2026_11_25_10_00_00.1", "/", "/")


@pytest.mark.parametrize("make", FOLDERS)
def test_short_and_unknown_records_are_counted_not_decoded(make):
    f = make()
    good = rec()
    f.feed([good[:40], b"\x09\x00\x00\x00" + good[4:], b"", good,
            rec(file_id=0, flags=wire.F_BY_DIR)])  # ext flag but no names
    groups = f.take()
    assert len(groups) == 1
    assert f.bad_records == 4


@pytest.mark.parametrize("make", FOLDERS)
def test_syscall_records(make):
    f = make()
    f.feed([wire.pack_syscall(pid=3, tid=3, cgroup_id=9, nr=39, ts_ns=t, comm=b"app") for t in (1, 2)])
    (g,) = f.take()
    assert g.kind == wire.REC_SYSCALL
    assert (g.pid, g.tid, g.cgroup_id, g.comm, g.nr, g.count, g.first_ts, g.last_ts, g.stamps) == \
        (3, 3, 9, "app", 39, 2, 1, 2, [1, 2])
    assert g == records.SyscallRecord(pid=3, tid=3, cgroup_id=9, comm="app", nr=39, count=2,
                                      first_ts=1, last_ts=2, stamps=[1, 2])


@pytest.mark.parametrize("make", FOLDERS)
def test_batch_stops_when_full(make):
    f = make(capacity=4)
    assert f.feed([rec(pid=p) for p in range(10)]) == 4
    assert f.full
    assert len(f.take()) == 4
    assert not f.full


@pytest.mark.parametrize("make", FOLDERS)
def test_distinct_accesses_are_bounded_by_groups_not_records(make):
    """A flood of unfoldable records (ever-different paths) fills a batch at
    max_groups, which bounds the Python objects take() builds; foldable
    ones still fill it to capacity."""
    f = make(capacity=64, max_groups=8)
    assert f.feed([rec(path=b"./" * i + b"k") for i in range(20)]) == 8
    assert f.full and len(f.take()) == 8
    assert f.feed([rec(ts=t) for t in range(100)]) == 64
    (group,) = f.take()
    assert group.count == 64


def test_twins_agree_on_a_mixed_stream():
    if RingReader is None:
        pytest.skip("extension not built")
    stream = []
    for i in range(500):
        stream.append(rec(pid=100 + i % 7, ts=i, path=b"p%d" % (i % 3)))
        if i % 50 == 0:
            stream.append(rec(file_id=0, flags=wire.F_BY_DIR, ts=i,
                              dnames=(b"k", b"..2026_01_01_00_00_00.1", b"v", b"p")))
    for keep in (True, False):
        a, b = wire.RecordFolder(keep_timestamps=keep), c_folder(keep_timestamps=keep)
        a.feed(stream)
        b.feed(stream)
        assert a.take() == b.take()


@pytest.mark.parametrize("make", FOLDERS)
def test_timestamps_only_when_kept(make):
    f = make(keep_timestamps=False)
    f.feed([rec(ts=t) for t in (5, 6)] + [rec(pid=11, ts=8)])
    assert [(g.count, g.first_ts, g.last_ts, g.stamps) for g in f.take()] == \
        [(2, 5, 6, None), (1, 8, 8, None)]


def test_the_twins_share_their_names():
    if _fast is None:
        pytest.skip("extension not built")
    for c, py in ((_fast.AccessRecord, records.AccessRecord),
                  (_fast.SyscallRecord, records.SyscallRecord)):
        assert c.kind == py.kind and c._fields == py._fields
        assert all(hasattr(c, f) for f in c._fields)
    assert records.REC_ACCESS == wire.REC_ACCESS and records.REC_SYSCALL == wire.REC_SYSCALL
    with pytest.raises(TypeError):
        _fast.AccessRecord()  # only the reader makes them


def test_pod_info_roundtrip_and_limits():
    raw = wire.pack_pod_info("uid-1", "ns", "pod", "c" * 64, 123, 2)
    assert len(raw) == wire.POD_INFO.size
    assert wire.unpack_pod_info(raw) == ("uid-1", "ns", "pod", "c" * 64, 123, 2)
    with pytest.raises(ValueError, match="namespace"):
        wire.pack_pod_info("u", "n" * 64, "p", None, 0, 0)
