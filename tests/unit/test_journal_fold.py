"""JournalSink folding, ordering, bounds and the stderr fallback (no journald needed).

The real-journald round trip is tests/kernel/test_journald.py.
"""
import io

import pytest

from tapio_node.events import AccessEvent, ProcessInfo
from tapio_node.outputs.journal import MESSAGE_IDS, JournalSink, record_fields

OWNER_UID = "0b0c1d2e-0000-4000-8000-000000000001"
OTHER_UID = "0b0c1d2e-0000-4000-8000-000000000002"


def make_event(pid=1234, comm="nginx", file="password", volume="db", accessor_uid=OWNER_UID,
               event_type="secret_access", ts="2026-11-25T10:00:00.000000001Z", cross=None):
    own = accessor_uid == OWNER_UID
    proc = ProcessInfo(
        pid=pid, command=comm, cgroup_id=777, container_id="c0ffee" if accessor_uid else None,
        pod_uid=accessor_uid, namespace=("prod" if own else "other") if accessor_uid else None,
        pod_name=("web-7d4" if own else "spy-1") if accessor_uid else None, role=None,
    )
    return AccessEvent(
        event_type=event_type, timestamp=ts, pod_uid=OWNER_UID, namespace="prod", pod_name="web-7d4",
        config_name="db-credentials", config_name_source="pod_spec", volume_name=volume,
        mount_path=f"/var/lib/kubelet/pods/{OWNER_UID}/volumes/kubernetes.io~secret/{volume}",
        file=file, path=f"/etc/db/{file}", process=proc,
        cross_pod=(not own) if cross is None else cross,
    )


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


class KernelClock:
    """Kernel ns -> a readable stand-in for RFC 3339."""

    def rfc3339(self, ns):
        return f"T{ns}"


def sink(window=10.0, **kw):
    """A sink writing to a StringIO (no journald socket at this path)."""
    out = io.StringIO()
    clock = Clock()
    s = JournalSink(window=window, socket_path="/nonexistent/tapio-test/socket", stream=out,
                    clock=clock, kernel_clock=KernelClock(), **kw)
    return s, out, clock


def records(out):
    lines = out.getvalue().splitlines()
    assert "not found; writing the access log to stderr" in lines[0]
    return lines[1:]


def test_fallback_notice_once_and_one_line_per_record():
    s, out, _ = sink(window=0)
    assert not s.using_journald
    for i in range(3):
        s.emit(make_event(pid=100 + i))
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert sum("journald socket" in line for line in lines) == 1
    assert lines[1] == "<6>nginx[100] (prod/web-7d4) read secret prod/db-credentials key password"


def test_loop_reader_folds_into_one_record_per_window():
    s, out, clock = sink()
    for i in range(1000):
        s.emit(make_event(ts=f"2026-11-25T10:00:{i % 60:02d}.000000000Z"))
    # First access of the (accessor, volume) pair was written at once.
    assert len(records(out)) == 1
    assert s.tick(clock.t + 9.999) == 0
    assert s.tick(clock.t + 10.0) == 1
    recs = records(out)
    assert len(recs) == 2
    assert recs[1].endswith(", 999 times from 2026-11-25T10:00:01.000000000Z to 2026-11-25T10:00:39.000000000Z")
    assert s.tick(clock.t + 100) == 0
    s.close()
    assert len(records(out)) == 2


def test_batch_count_is_added():
    s, out, clock = sink()
    s.emit(make_event())
    s.emit(make_event(), 41, first_ns=1, last_ns=2)
    s.emit(make_event(), 1, last_ns=3)
    s.close()
    recs = records(out)
    assert len(recs) == 2
    assert recs[1].endswith(", 42 times from T1 to T3")


def test_new_key_of_known_pair_waits_for_window_new_pair_is_immediate():
    s, out, clock = sink()
    s.emit(make_event(file="password"))
    s.emit(make_event(file="username"))            # same pair, new key: folded
    assert len(records(out)) == 1
    s.emit(make_event(pid=99, accessor_uid=OTHER_UID, comm="curl"))  # new pair: at once
    recs = records(out)
    assert len(recs) == 2
    assert recs[1] == "<4>curl[99] (other/spy-1) read secret prod/db-credentials key password (cross-pod)"
    clock.t += 10
    s.tick()
    recs = records(out)
    assert len(recs) == 3
    assert "key username" in recs[2] and "times" not in recs[2]


def test_host_process_and_kubelet_role():
    s, out, _ = sink(window=0)
    ev = make_event(accessor_uid=None, comm="kubelet", pid=42, cross=False)
    ev.process.role = "kubelet"
    s.emit(ev)
    assert records(out) == ["<6>kubelet[42] (host, kubelet) read secret prod/db-credentials key password"]


def test_fold_table_is_bounded_and_flushes_oldest():
    s, out, clock = sink(max_entries=8)
    s.emit(make_event(pid=1))                     # pair now known
    for pid in range(2, 200):
        s.emit(make_event(pid=pid))
        clock.t += 0.001
    assert len(s._table) <= 8
    # 198 folds, 8 still held: 190 flushed early by overflow, +1 first record.
    assert len(records(out)) == 1 + 190
    s.close()
    assert len(records(out)) == 1 + 198


def test_pair_memory_is_bounded():
    s, out, _ = sink(max_pairs=4)
    for i in range(50):
        s.emit(make_event(volume=f"v{i}"))
    assert len(s._pairs) == 4


def test_record_fields():
    ev = make_event(pid=5, accessor_uid=OTHER_UID, comm="curl")
    f = record_fields(ev, 3, "T1", "T2", "tapio-node")
    assert f["MESSAGE_ID"] == MESSAGE_IDS["secret_access"]
    assert f["PRIORITY"] == "4"
    assert f["SYSLOG_IDENTIFIER"] == "tapio-node"
    assert f["TAPIO_ACCESSOR_POD"] == "other/spy-1"
    assert f["TAPIO_ACCESSOR_POD_UID"] == OTHER_UID
    assert f["TAPIO_POD_UID"] == OWNER_UID
    assert f["TAPIO_CROSS_POD"] == "true"
    assert f["TAPIO_COUNT"] == "3"
    assert (f["TAPIO_FIRST_SEEN"], f["TAPIO_LAST_SEEN"]) == ("T1", "T2")
    assert f["TAPIO_PROCESS_PID"] == "5" and f["TAPIO_PROCESS_COMM"] == "curl"
    assert f["TAPIO_CGROUP_ID"] == "777" and f["TAPIO_CONTAINER_ID"] == "c0ffee"
    assert "TAPIO_ROLE" not in f  # None fields are left out
    assert "TAPIO_STALE_INODE" not in f
    assert "OBJECT_PID" not in f  # folded records: the pid may be reused by flush time
    assert record_fields(ev, 1, "T1", "T1", "tapio-node", live=True)["OBJECT_PID"] == "5"
    cm = record_fields(make_event(event_type="configmap_access", cross=True), 1, "T", "T", "x")
    assert cm["PRIORITY"] == "6"  # only secrets read cross-pod are warnings
    assert cm["MESSAGE_ID"] == MESSAGE_IDS["configmap_access"]
    assert len(set(MESSAGE_IDS.values())) == 3


@pytest.mark.parametrize("policy,verb", [("denied", "was denied"),
                                         ("would_deny", "read (enforce would deny)")])
def test_a_policy_violation_has_its_own_id_at_warning(policy, verb):
    from tapio_node.events import POLICY_VIOLATION_MESSAGE_ID

    ev = make_event(event_type="configmap_access", accessor_uid=OTHER_UID)
    ev.policy = policy
    f = record_fields(ev, 1, "T", "T", "x")
    assert (f["MESSAGE_ID"], f["PRIORITY"], f["TAPIO_POLICY"]) == (POLICY_VIOLATION_MESSAGE_ID, "4", policy)
    assert f" {verb} configmap " in f["MESSAGE"]
    assert POLICY_VIOLATION_MESSAGE_ID not in MESSAGE_IDS.values()
    ev.policy = "allowed"
    f = record_fields(ev, 1, "T", "T", "x")
    assert (f["MESSAGE_ID"], f["PRIORITY"], f["TAPIO_POLICY"]) == (MESSAGE_IDS["configmap_access"], "6", "allowed")


def test_bad_window():
    with pytest.raises(ValueError, match="window"):
        JournalSink(window=-1, socket_path="/nonexistent", stream=io.StringIO())


def test_optional_event_fields():
    from tapio_node.events import Workload

    ev = make_event()
    ev.workload = Workload(kind="Deployment", name="web")
    ev.service_account = "web-sa"
    ev.syscall = "openat2"
    ev.stale_inode = True
    f = record_fields(ev, 1, "T", "T", "tapio-node")
    assert f["TAPIO_WORKLOAD"] == "Deployment/web"
    assert f["TAPIO_SERVICE_ACCOUNT"] == "web-sa"
    assert f["TAPIO_SYSCALL"] == "openat2"
    assert f["TAPIO_STALE_INODE"] == "true"


def test_fallback_cannot_be_forged_by_a_newline_in_a_name():
    """A command or key with a newline stays one stderr line."""
    s, out, _ = sink(window=0)
    s.emit(make_event(comm="x\n<3>kubelet", file="pass\nword"))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2   # the fallback notice, then the record
    assert lines[1].startswith("<6>x\\x0a<3>kubelet[1234]") and "pass\\x0aword" in lines[1]
