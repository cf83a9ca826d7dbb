"""The one table of event types: every output reads its names from it,
and the names are a contract (dashboards, alerts, journalctl queries)."""
import pytest

from tapio_node import events as ev
from tapio_node.metrics import Metrics, PREFIX
from tapio_node.outputs.journal import MESSAGE_IDS, record_fields


def make_event(event_type):
    return ev.AccessEvent(
        event_type=event_type, timestamp="T", pod_uid="u", namespace="prod", pod_name="web",
        config_name="db-credentials", config_name_source="volume_name", volume_name="db",
        mount_path="/var/lib/kubelet/pods/u/volumes/kubernetes.io~secret/db", file="password",
        path="/etc/db/password", process=ev.ProcessInfo(pid=1, command="app", cgroup_id=2),
        cross_pod=False)

# What operators have been told; changing any of these breaks them.
CONTRACT = {
    "configmap_access": ("configmap", "kernel_monitor_configmap_access", "configmap",
                         "c50a7d905b874921b39256c4b8e3ed30", "configmap"),
    "secret_access": ("secret", "kernel_monitor_secret_access", "secret",
                      "c74a8c7ec43e460e88a390d265110be6", "secret"),
    "projected_access": ("projected", "kernel_monitor_projected_access", "volume",
                         "601c75ef1e83445397c510929610c98a", "projected volume"),
}


def test_the_table_holds_the_contract():
    for event_type, (volume_kind, metric, label, message_id, wording) in CONTRACT.items():
        k = ev.BY_EVENT_TYPE[event_type]
        assert (k.volume_kind, f"{PREFIX}_{k.metric}", k.metric_label, k.message_id, k.wording) == \
            (volume_kind, metric, label, message_id, wording)
        assert ev.BY_VOLUME_KIND[volume_kind] is k
    assert ev.POD_SYSCALL == "pod_syscall" and ev.SYSCALL.metric is None
    assert [k.event_type for k in ev.ACCESS_KINDS] == list(CONTRACT)
    ids = [k.message_id for k in ev.KINDS if k.message_id] + [ev.OTHER_MESSAGE_ID]
    assert len(set(ids)) == len(ids)


def test_metrics_counters_come_from_the_table():
    m = Metrics()
    for k in ev.ACCESS_KINDS:
        m.access(k.event_type, "ns", "obj")
    names = {metric.name: metric for metric in m.registry.collect()}
    for k in ev.ACCESS_KINDS:
        family = names[f"{PREFIX}_{k.metric}"]
        assert family.documentation == k.metric_help
        (sample,) = [s for s in family.samples if s.name.endswith("_total")]
        assert sample.labels == {"namespace": "ns", k.metric_label: "obj"}
    with pytest.raises(ValueError, match="unknown access event type"):
        m.access(ev.POD_SYSCALL, "ns", "obj")


@pytest.mark.parametrize("kind", ev.ACCESS_KINDS, ids=lambda k: k.event_type)
def test_journal_words_and_ids_come_from_the_table(kind):
    f = record_fields(make_event(event_type=kind.event_type), 1, "T", "T", "tapio-node")
    assert f["MESSAGE_ID"] == kind.message_id == MESSAGE_IDS[kind.event_type]
    assert f" read {kind.wording} prod/db-credentials " in f["MESSAGE"]


def test_an_unknown_event_type_gets_the_fixed_other_id():
    f = record_fields(make_event(event_type="future_access"), 1, "T", "T", "tapio-node")
    assert f["MESSAGE_ID"] == ev.OTHER_MESSAGE_ID
    assert " read future_access " in f["MESSAGE"]
