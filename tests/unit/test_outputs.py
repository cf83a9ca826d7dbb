"""Every output is a Sink: one emit signature, the same four methods."""
import inspect
import io
import os

import pytest

from tapio_node import events as ev
from tapio_node.outputs import NullSink, Sink, open_sink
from tapio_node.outputs.journal import JournalSink
from tapio_node.outputs.stdout import StdoutSink

SINKS = [StdoutSink, JournalSink, NullSink]


def _params(fn):
    return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


@pytest.mark.parametrize("cls", SINKS, ids=lambda c: c.__name__)
def test_each_sink_has_the_protocol_methods_and_emit_signature(cls):
    assert _params(cls.emit) == _params(Sink.emit)
    for name in ("flush", "tick", "close"):
        assert callable(getattr(cls, name))


def test_open_sink_picks_the_output():
    clock = ev.Clock()
    n = open_sink("none", clock)
    assert isinstance(n, NullSink) and n.dropped_lines == 0
    r, w = os.pipe()
    try:
        s = open_sink("stdout", clock, stream=io.FileIO(w, "w", closefd=False))
        assert isinstance(s, StdoutSink) and s.clock is clock and s.dropped_lines == 0
        s.close()
    finally:
        os.close(r)
        os.close(w)
    j = open_sink("journal", clock, journal_fold_window=2.5)
    assert isinstance(j, JournalSink) and j.window == 2.5 and j.dropped_lines == 0
    j.close()


def test_the_journal_sink_words_kernel_times_with_the_daemon_clock():
    out = io.StringIO()
    clock = ev.Clock()
    s = JournalSink(window=0, socket_path="/nonexistent/tapio-test/socket", stream=out,
                    kernel_clock=clock)
    event = ev.AccessEvent(
        event_type="secret_access", timestamp="unused", pod_uid="u", namespace="prod",
        pod_name="web", config_name="db", config_name_source="volume_name", volume_name="db",
        mount_path="/m", file="password", path="/etc/db/password",
        process=ev.ProcessInfo(pid=1, command="app", cgroup_id=2), cross_pod=False)
    s.emit(event, 3, 10**18, 10**18 + 5, [10**18, 10**18 + 1, 10**18 + 5])
    line = out.getvalue().splitlines()[-1]
    assert line.endswith(f", 3 times from {clock.rfc3339(10**18)} to {clock.rfc3339(10**18 + 5)}")
