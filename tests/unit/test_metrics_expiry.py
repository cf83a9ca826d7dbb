"""Series of gone pods and volumes expire (after a grace for scrapes), so
pod churn cannot fill the metrics_max_series cap for good."""
from prometheus_client import generate_latest

from tapio_node.metrics import SERIES_GRACE_SECONDS, Metrics


def _text(m: Metrics) -> str:
    return generate_latest(m.registry).decode()


def test_a_gone_volumes_series_expires_after_the_grace():
    m = Metrics(max_series=3)
    m.access("secret_access", "shop", "db", volume_id=1)
    m.access("secret_access", "shop", "db", volume_id=2)       # the same Secret in another pod
    m.access("configmap_access", "shop", "cfg", volume_id=2)
    assert m.series == 2
    m.expire({1: None}, now=1000.0)                      # volume 2's pod is gone
    assert 'configmap="cfg"' in _text(m)                 # still scrapable for a while
    m.expire({1: None}, now=1000.0 + SERIES_GRACE_SECONDS - 1)
    assert 'configmap="cfg"' in _text(m)
    assert m.expire({1: None}, now=1000.0 + SERIES_GRACE_SECONDS) == 1
    text = _text(m)
    assert 'configmap="cfg"' not in text and 'secret="db"' in text   # volume 1 still has it
    assert m.series == 1
    # The freed room takes new pods' series again (the cap is 3).
    for i in range(2):
        m.access("secret_access", "churn", f"s{i}", volume_id=10 + i)
    assert 'secret="s1"' in _text(m) and 'namespace="__overflow__"' not in _text(m)


def test_an_access_before_the_deadline_keeps_the_series():
    m = Metrics()
    m.access("secret_access", "shop", "db", volume_id=1)
    m.expire(set(), now=0.0)
    m.access("secret_access", "shop", "db", volume_id=3)       # a new pod mounts it
    assert m.expire({3}, now=SERIES_GRACE_SECONDS + 1) == 0
    assert 'secret="db"' in _text(m)


def test_service_account_volumes_share_one_label():
    m = Metrics()
    for suffix in ("abcde", "x7k2q", "9zz01"):
        m.access("projected_access", "shop", f"kube-api-access-{suffix}", volume_id=1)
    m.access("projected_access", "shop", "kube-api-access-custom-name", volume_id=1)
    text = _text(m)
    assert 'kernel_monitor_projected_access_total{namespace="shop",volume="kube-api-access"} 3.0' in text
    assert 'volume="kube-api-access-custom-name"' in text
    assert m.series == 2
