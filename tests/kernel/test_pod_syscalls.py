"""pod_syscall records: 1 in N syscalls of processes in known pod cgroups."""
import pytest

from harness import daemon_factory  # noqa: F401  (fixture)
from tapio_node.sim.node import VolumeSpec

pytestmark = pytest.mark.kernel


def test_sampled_syscalls_only_from_pod_processes(sim_node, daemon_factory):
    pod = sim_node.add_pod("batch", "job-0", [VolumeSpec("configmap", "cfg", {"k": b"v"})],
                           service_account=False)
    ctr = pod.add_container("job")
    d = daemon_factory(sim_node.write_config(syscall_sampling_rate=1))
    s_pod = ctr.start_reader("/run/config/cfg/k", count=200).wait()
    s_host = sim_node.start_host_reader("/etc/hostname", count=200).wait()
    d.wait_events(1, pred=lambda e: e["event_type"] == "pod_syscall"
                  and e["process"]["pid"] == s_pod["pid"])
    d.settle()
    sampled = [e for e in d.lines if e["event_type"] == "pod_syscall"]
    mine = [e for e in sampled if e["process"]["pid"] == s_pod["pid"]]
    assert mine, "no pod_syscall event for the pod's reader"
    assert all(e["pod_uid"] == pod.uid and e["process"]["container_id"] == ctr.id for e in mine)
    # 200 opens + reads + closes: with rate 1 every syscall is sampled.
    assert sum(e["count"] for e in mine) >= 600
    assert not [e for e in sampled if e["process"]["pid"] == s_host["pid"]]


def _attached(d):
    lines = [line for line in d.stderr if "attached " in line]
    assert lines, "the daemon did not log what it attached"
    return lines[0]


@pytest.mark.parametrize("rate, attached", [(0, False), (50, True)])
def test_sampling_program_attached_only_when_enabled(sim_node, daemon_factory, rate, attached):
    d = daemon_factory(sim_node.write_config(syscall_sampling_rate=rate))
    line = _attached(d)
    assert "trace_config_access" in line
    assert ("trace_pod_syscalls" in line) is attached
