import io
import json
import os
import time

from tapio_node import events as ev
from tapio_node.outputs.stdout import StdoutSink


def _event(ts="x"):
    return ev.AccessEvent(
        event_type="secret_access", timestamp=ts, pod_uid="u", namespace="prod", pod_name="web",
        config_name="db", config_name_source="volume_name", volume_name="db",
        mount_path="/var/lib/kubelet/pods/u/volumes/kubernetes.io~secret/db", file="password",
        path="/etc/db/password", process=ev.ProcessInfo(pid=1, command="app", cgroup_id=2),
        cross_pod=False)


def test_event_json_has_the_base_fields():
    d = json.loads(ev.encode(_event("2026-01-01T00:00:00.000000001Z")))
    for key in ("event_type", "timestamp", "pod_uid", "namespace", "config_name", "mount_path"):
        assert key in d
    assert d["process"] == {"pid": 1, "command": "app", "cgroup_id": 2, "tid": None,
                            "container_id": None, "pod_uid": None, "namespace": None,
                            "pod_name": None, "role": None}


def test_clock_is_rfc3339_utc_now_not_1970():
    clock = ev.Clock()
    stamp = clock.rfc3339(time.clock_gettime_ns(time.CLOCK_MONOTONIC))
    assert stamp.endswith("Z") and len(stamp) == len("2026-11-25T10:00:00.123456789Z")
    assert stamp[:4] == time.strftime("%Y", time.gmtime())
    a = clock.rfc3339(10**18)
    b = clock.rfc3339(10**18 + 1)
    assert a < b


def test_clock_keeps_every_nanosecond_and_the_second_it_falls_in():
    clock = ev.Clock()
    # A fixed offset, so the expected strings do not depend on when the test runs.
    clock.offset_ns = 1_767_225_600 * 10**9   # 2026-01-01T00:00:00Z
    assert clock.rfc3339(5_000_000_001) == "2026-01-01T00:00:05.000000001Z"
    assert clock.rfc3339(5_999_999_999) == "2026-01-01T00:00:05.999999999Z"
    # The cached second prefix moves on with the second, both ways.
    assert clock.rfc3339(6_000_000_000) == "2026-01-01T00:00:06.000000000Z"
    assert clock.rfc3339(86_400 * 10**9) == "2026-01-02T00:00:00.000000000Z"
    assert clock.rfc3339(5_000_000_001) == "2026-01-01T00:00:05.000000001Z"
    assert clock.realtime_ns(5) == clock.offset_ns + 5
    # The measured offset: now in monotonic time is now in real time.
    clock.refresh()
    mono = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    assert abs(clock.realtime_ns(mono) - time.clock_gettime_ns(time.CLOCK_REALTIME)) < 10**9
    assert clock.rfc3339(mono + 1)[-10:-1] == f"{(mono + 1 + clock.offset_ns) % 10**9:09d}"


def test_stdout_sink_writes_one_line_per_access_with_its_timestamp():
    r, w = os.pipe()
    sink = StdoutSink(io.FileIO(w, "w", closefd=False), ev.Clock())
    mono = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    stamps = [mono, mono + 1, mono + 2]
    sink.emit(_event(sink.clock.rfc3339(mono)), 3, mono, mono + 2, stamps)
    sink.emit(_event(sink.clock.rfc3339(mono)), 1, mono, mono, [mono])
    sink.close()
    os.close(w)
    lines = os.read(r, 1 << 16).decode().splitlines()
    os.close(r)
    assert len(lines) == 4
    parsed = [json.loads(x) for x in lines]
    assert [p["timestamp"] for p in parsed[:3]] == [sink.clock.rfc3339(t) for t in stamps]
    assert all(p["file"] == "password" for p in parsed)
