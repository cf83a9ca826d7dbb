"""The access store and `tapio-node report` on what the real daemon saw on
a simulated node: real BPF, pods reading their volumes through their
in-container paths, other pods and host processes reading them too, and
pod specs from a local Kubernetes API (Deployment workloads) or static
manifests."""
import json
import os
import re
import subprocess
import sys
import time

import pytest

from harness import SLOWDOWN, daemon_factory, metric_value  # noqa: F401  (fixture)
from tapio_node import host
from tapio_node.sim.node import SA_MOUNT, VolumeSpec
from tapio_node.sim.system import MS_RDONLY, mount, umount

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "integration"))
from kube_api_server import KubeAPIServer, TestPKI, write_kubeconfig  # noqa: E402

pytestmark = pytest.mark.kernel

SNAPSHOTS = os.path.join(os.path.dirname(__file__), "snapshots")


def report(cfg, *args, fmt="json", check=True):
    r = subprocess.run([sys.executable, "-m", "tapio_node", "report", "--config", cfg, "--format", fmt,
                        *args], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, COLUMNS="140"))
    if check:
        assert r.returncode == 0, r.stderr
    return (json.loads(r.stdout) if fmt == "json" else r.stdout) if check else r


def wait_report(cfg, pred, *args, timeout=20.0):
    """The report once pred(report) holds (rows reach the store within a
    second or two of the reads); the last one otherwise."""
    deadline = time.monotonic() + timeout * SLOWDOWN
    while True:
        got = report(cfg, *args)
        if pred(got) or time.monotonic() >= deadline:
            return got
        time.sleep(0.3)


def state_path(cfg):
    import yaml

    with open(cfg) as f:
        return yaml.safe_load(f)["kernel_collector"]["state_path"]


def _shop(node):
    """web: reads tls.crt (not tls.key) and app.yaml (not extra.yaml), never
    its db secret nor its token; features: a ConfigMap read whole."""
    return node.add_pod("shop", "web", [
        VolumeSpec("secret", "certs", {"tls.key": b"K", "tls.crt": b"C"}, source_name="web-tls"),
        VolumeSpec("secret", "db", {"password": b"p"}, source_name="db-credentials"),
        VolumeSpec("configmap", "app-config", {"app.yaml": b"a", "extra.yaml": b"e"}, source_name="web-settings"),
        VolumeSpec("configmap", "features", {"flags": b"f"}, source_name="feature-flags"),
    ], static=True)


def _read_web(web_ctr):
    for path, n in (("/run/secrets/certs/tls.crt", 3), ("/run/config/app-config/app.yaml", 2),
                    ("/run/config/features/flags", 1)):
        web_ctr.start_reader(path, count=n, comm="nginx").wait()


@pytest.fixture
def shop(sim_node):
    web = _shop(sim_node)
    api = sim_node.add_pod("ops", "api", [], static=True)  # reads its token
    snoop = sim_node.add_pod("batch", "snoop", [], static=True)
    return web, api, snoop


def _reads(sim_node, web, api, snoop):
    _read_web(web.containers["nginx"])
    api.containers["main"].start_reader(f"{SA_MOUNT}/token", comm="api").wait()
    # Another pod and a host process read web's secret through its host path.
    snoop.containers["main"].start_reader(web.volume_dir("certs") + "/tls.crt", mounts={}, comm="snoop").wait()
    sim_node.start_host_reader(web.volume_dir("certs") + "/tls.key", comm="backup").wait()


def _containers(web, api, snoop):
    web.add_container("nginx")
    api.add_container("main")
    snoop.add_container("main")


@pytest.fixture
def shop_seen(sim_node, daemon_factory, shop):
    """The shop scenario read through, its rows in the store: (cfg, web, api, snoop)."""
    web, api, snoop = shop
    _containers(web, api, snoop)
    cfg = sim_node.write_config()
    daemon_factory(cfg)
    _reads(sim_node, web, api, snoop)
    # 3 + 2 + 1 by web, its token by api, tls.crt by snoop, tls.key by the host.
    top = wait_report(cfg, lambda r: sum(o["reads"] for o in r["top"]) >= 9, "top", "--since", "0s")
    assert sum(o["reads"] for o in top["top"]) == 9
    return cfg, web, api, snoop


def _unused_keys(rep):
    return {(u["namespace"], u["name"], u["key"]) for u in rep["unused"]}


def test_unused_secret_and_key_and_a_read_configmap_is_not(shop_seen):
    cfg, web, _api, _snoop = shop_seen
    rep = report(cfg, "--since", "0s")
    unused = _unused_keys(rep)
    # Never read: the whole db secret (key null) and web-tls's tls.key: the
    # host read it, web never did.
    assert ("shop", "db-credentials", None) in unused
    assert ("shop", "web-tls", "tls.key") in unused
    assert ("shop", "web-settings", "extra.yaml") in unused
    # Read: web-tls's tls.crt, web-settings's app.yaml, feature-flags entirely.
    assert not {k for k in unused if k[1] == "feature-flags"}
    assert ("shop", "web-settings", "app.yaml") not in unused
    assert ("shop", "web-settings", None) not in unused
    assert ("shop", "web-tls", None) not in unused
    db = next(u for u in rep["unused"] if u["name"] == "db-credentials")
    assert (db["kind"], db["volume"], db["pod"], db["workload"]) == ("secret", "db", web.name, f"Pod/{web.name}")
    assert db["mounted_since"].endswith("Z")
    # Mounted for at least a day: nothing here has been.
    assert report(cfg, "unused", "--since", "1d")["unused"] == []


def test_least_privilege_for_an_unread_token_and_secret(shop_seen):
    cfg = shop_seen[0]
    rep = report(cfg, "--since", "0s")
    lp = report(cfg, "least-privilege", "--since", "0s")["least_privilege"]
    assert lp == rep["least_privilege"]
    assert set(rep) >= {"unused", "readers", "least_privilege", "cross_pod", "top", "new"}
    by = {(x["namespace"], x["kind"], x["name"]): x for x in lp}
    token = by[("shop", "serviceAccountToken", "default")]
    assert token["volume"].startswith("kube-api-access-")
    assert "automountServiceAccountToken: false" in token["suggestion"]
    assert "drop volume db" in by[("shop", "secret", "db-credentials")]["suggestion"]
    # api read its token; web read tls.crt of web-tls.
    assert ("ops", "serviceAccountToken", "default") not in by
    assert ("shop", "secret", "web-tls") not in by
    assert set(lp[0]) >= {"namespace", "workload", "pod", "kind", "name", "volume", "suggestion"}


def test_readers_cross_pod_and_blast_radius(shop_seen):
    cfg, web, _api, snoop = shop_seen
    rep = report(cfg, "readers", "--object", "shop/web-tls", "--since", "1h")
    (tls,) = rep["readers"]
    assert (tls["kind"], tls["reads"]) == ("secret", 5)
    kinds = {(r["kind"], r["command"], r["count"]) for r in tls["readers"]}
    assert kinds == {("pod", "nginx", 3), ("pod", "snoop", 1), ("host", "backup", 1)}
    own = next(r for r in tls["readers"] if r["command"] == "nginx")
    assert (own["namespace"], own["pod"], own["workload"]) == ("shop", web.name, f"Pod/{web.name}")
    assert own["container"] == web.containers["nginx"].id
    hostr = next(r for r in tls["readers"] if r["kind"] == "host")
    assert hostr["host_cgroup"] == host.cgroup_v2_path(host.proc_cgroup(os.getpid()))
    assert set(own) == {"kind", "namespace", "workload", "pod", "container", "host_cgroup", "command",
                        "count", "last_read"}

    cross = report(cfg, "cross-pod", "--since", "1h")["cross_pod"]
    got = {(c["accessor"]["kind"], c["accessor"]["command"], c["key"], c["cross_namespace"]) for c in cross}
    assert got == {("pod", "snoop", "tls.crt", True), ("host", "backup", "tls.key", False)}
    assert cross[0]["owner"] == {"namespace": "shop", "pod": web.name, "workload": f"Pod/{web.name}"}

    (blast,) = report(cfg, "blast-radius", "--object", "shop/web-tls")["blast_radius"]
    who = {(r["kind"], r["namespace"], r["workload"], r["count"]) for r in blast["readers"]}
    assert ("pod", "shop", f"Pod/{web.name}", 3) in who and ("pod", "batch", f"Pod/{snoop.name}", 1) in who
    assert any(r["kind"] == "host" for r in blast["readers"])
    assert [m["workload"] for m in blast["mounted_by"]] == [f"Pod/{web.name}"]
    assert all(r["last_read"] for r in blast["readers"])
    r = report(cfg, "blast-radius", check=False)
    assert r.returncode == 2 and "--object" in r.stderr


def test_workloads_from_the_api_group_replicas(sim_node, daemon_factory, tmp_path):
    """Two replicas of a Deployment: a key read by either is used; one never
    read by both is unused once, for the workload. The specs reach the API
    only after a first read of each pod: what was recorded under the
    volume's name then counts for the object the spec names."""
    import sqlite3

    pki = TestPKI(str(tmp_path / "pki"))
    srv = KubeAPIServer(pki, nodes={sim_node.node_name}).start()
    try:
        pods = []
        for suffix in ("x2kqp", "b7hzr"):
            pod = sim_node.add_pod("shop", f"web-7d4b9c-{suffix}", [
                VolumeSpec("configmap", "app-config", {"a.yaml": b"a", "b.yaml": b"b", "c.yaml": b"c"},
                           source_name="web-settings")])
            pod.add_container("nginx")
            pods.append(pod)
        kubeconfig = write_kubeconfig(str(tmp_path / "kubelet.conf"), srv.url, pki.ca,
                                      cert=pki.client("kubelet", sim_node.node_name))
        cfg = sim_node.write_config(kubeconfig=kubeconfig)
        d = daemon_factory(cfg)
        for pod, key in zip(pods, ("a.yaml", "b.yaml")):
            s = pod.containers["nginx"].start_reader(f"/run/config/app-config/{key}").wait()
            (e,) = d.wait_events(1, pred=lambda e: e["process"]["pid"] == s["pid"])
            assert e["config_name_source"] == "volume_name"
        for pod in pods:
            m = pod.manifest()
            m["metadata"]["labels"] = {"pod-template-hash": "7d4b9c"}
            m["metadata"]["ownerReferences"] = [{"kind": "ReplicaSet", "name": "web-7d4b9c", "controller": True}]
            srv.put_pod(m)
        # Pod specs arrive asynchronously: read again once they name the object.
        deadline = time.monotonic() + 15 * SLOWDOWN
        for pod, key in zip(pods, ("a.yaml", "b.yaml")):
            while True:
                s = pod.containers["nginx"].start_reader(f"/run/config/app-config/{key}").wait()
                (e,) = d.wait_events(1, pred=lambda e: e["process"]["pid"] == s["pid"])
                if e["config_name_source"] == "pod_spec" or time.monotonic() > deadline:
                    break
            assert (e["config_name"], e["workload"]) == ("web-settings", {"kind": "Deployment", "name": "web"})
        # The volume was first inventoried under its volume name, before the
        # specs came: only the newest naming of a file counts.
        want = [("web-settings", "Deployment/web", "c.yaml", 2)]
        got = lambda r: [(u["name"], u["workload"], u["key"], u["pods"]) for u in r["unused"]]  # noqa: E731
        assert got(wait_report(cfg, lambda r: got(r) == want, "--since", "0s")) == want
        rep = wait_report(cfg, lambda r: len(r["readers"]) == 1 and r["readers"][0]["reads"] >= 4,
                          "readers", "--object", "shop/web-settings", "--since", "1h")
        readers = {(r["workload"], r["pod"]) for o in rep["readers"] for r in o["readers"]}
        assert {("Deployment/web", p.name) for p in pods} <= readers
        with sqlite3.connect(f"file:{state_path(cfg)}/access.db?mode=ro", uri=True) as conn:
            early = conn.execute("SELECT sum(count) FROM accesses WHERE object_name = 'app-config'").fetchone()[0]
            total = conn.execute("SELECT sum(count) FROM accesses WHERE volume_name = 'app-config'").fetchone()[0]
        assert early == 2 and total >= 4
        (top,) = report(cfg, "top", "--since", "1h")["top"]
        assert (top["kind"], top["name"], top["reads"]) == ("configmap", "web-settings", total)
        assert rep["readers"][0]["reads"] == total
    finally:
        srv.stop()


def test_a_restart_keeps_the_history(sim_node, daemon_factory):
    web = _shop(sim_node)
    ctr = web.add_container("nginx")
    cfg = sim_node.write_config()
    d = daemon_factory(cfg)
    ctr.start_reader("/run/secrets/certs/tls.crt", count=3, comm="nginx").wait()
    pred = lambda r: r["readers"] and r["readers"][0]["reads"] == 3  # noqa: E731
    before = wait_report(cfg, pred, "--object", "shop/web-tls", "--since", "1h")
    assert before["readers"][0]["reads"] == 3
    mounted = report(cfg, "unused", "--since", "0s")["unused"]
    assert d.stop()[0] == 0
    since = {(u["name"], u["key"]): u["mounted_since"] for u in mounted}
    assert since
    d = daemon_factory(cfg)
    after = report(cfg, "--object", "shop/web-tls", "--since", "1h")
    assert after["readers"] == before["readers"]
    ctr.start_reader("/run/secrets/certs/tls.crt", count=2, comm="nginx").wait()
    pred = lambda r: r["readers"] and r["readers"][0]["reads"] == 5  # noqa: E731
    again = wait_report(cfg, pred, "readers", "--object", "shop/web-tls", "--since", "1h")
    (row,) = again["readers"][0]["readers"]
    assert row["count"] == 5
    # The mount inventory keeps when each was first mounted.
    now = {(u["name"], u["key"]): u["mounted_since"] for u in report(cfg, "unused", "--since", "0s")["unused"]}
    assert since.keys() <= now.keys() and all(now[k] == v for k, v in since.items())


def new_readers(text, secret, namespace="shop"):
    """kernel_monitor_new_reader_total of a secret (its `name` label is
    metric_value's first parameter's name, hence this)."""
    from prometheus_client.parser import text_string_to_metric_families

    want = {"namespace": namespace, "kind": "secret", "name": secret}
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "kernel_monitor_new_reader_total" and s.labels == want)


def test_new_reader_alert_after_the_learning_period(sim_node, daemon_factory):
    web = _shop(sim_node)
    ctr = web.add_container("nginx")
    snoop = sim_node.add_pod("batch", "snoop", [], static=True)
    sctr = snoop.add_container("main")
    # First run: still learning (1h): web's read of web-tls is learned.
    cfg = sim_node.write_config(learning_period="1h")
    d = daemon_factory(cfg)
    ctr.start_reader("/run/secrets/certs/tls.crt", comm="nginx").wait()
    wait_report(cfg, lambda r: bool(r["readers"]), "readers", "--since", "1h")
    text = d.get("/metrics")[1].decode()
    assert new_readers(text, "web-tls") == 0
    assert d.stop()[0] == 0
    # Second run: the learning period is over; the learned pair stays quiet,
    # a new reader (another workload) is alerted on once.
    cfg = sim_node.write_config(learning_period="0s", state_path=state_path(cfg))
    d = daemon_factory(cfg)
    ctr.start_reader("/run/secrets/certs/tls.crt", comm="nginx").wait()
    for _ in range(2):
        sctr.start_reader(web.volume_dir("certs") + "/tls.key", mounts={}, comm="snoop").wait()
    deadline = time.monotonic() + 10 * SLOWDOWN
    while time.monotonic() < deadline:
        text = d.get("/metrics")[1].decode()
        if new_readers(text, "web-tls"):
            break
        time.sleep(0.2)
    assert new_readers(text, "web-tls") == 1
    assert d.stop()[0] == 0
    alerts = [line for line in d.stderr if "new reader" in line]
    assert len(alerts) == 1, d.stderr
    assert alerts[0].startswith("<4>") and f"batch/Pod/{snoop.name}" in alerts[0] and "shop/web-tls" in alerts[0]
    new = report(cfg, "new", "--since", "1h")["new"]
    assert {(n["accessor"]["workload"], n["name"]) for n in new} >= {(f"Pod/{snoop.name}", "web-tls")}


def test_a_read_only_state_dir_is_reported_and_collection_goes_on(sim_node, daemon_factory, tmp_path):
    state = str(tmp_path / "state")
    os.mkdir(state)
    mount("tmpfs", state, "tmpfs", MS_RDONLY, "mode=0700")  # even root cannot write there
    try:
        web = _shop(sim_node)
        ctr = web.add_container("nginx")
        cfg = sim_node.write_config(state_path=state)
        d = daemon_factory(cfg)
        s = ctr.start_reader("/run/secrets/certs/tls.crt", comm="nginx").wait()
        assert d.wait_events(1, pred=lambda e: e["process"]["pid"] == s["pid"])
        deadline = time.monotonic() + 10 * SLOWDOWN
        while time.monotonic() < deadline:
            text = d.get("/metrics")[1].decode()
            if metric_value(text, "kernel_monitor_store_errors_total", operation="open") >= 2:
                break
            time.sleep(0.2)
        assert metric_value(text, "kernel_monitor_store_errors_total", operation="open") >= 2
        assert metric_value(text, "kernel_monitor_store_up") == 0
        assert metric_value(text, "kernel_monitor_secret_access_total", namespace="shop", secret="web-tls") == 1
        # Collection goes on after the failure.
        s = ctr.start_reader("/run/secrets/certs/tls.crt", comm="nginx").wait()
        assert d.wait_events(1, pred=lambda e: e["process"]["pid"] == s["pid"])
        assert any("access store" in line and "failed" in line for line in d.stderr)
        code, body = d.get("/healthz")
        health = json.loads(body)
        assert code == 200 and (health["status"], health["store"]) == ("degraded", "failing")
        assert any("access store failing (open:" in r for r in health["degraded"])
        r = report(cfg, check=False)
        assert r.returncode == 1 and "no access store" in r.stderr
        assert d.stop()[0] == 0
    finally:
        if state in host.mounts_under(str(tmp_path)):
            umount(state)


_NORMALISE = [
    (re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d(:\d\d)?Z?"), "<time>"),
    (re.compile(r"kube-api-access-[a-z0-9]{5}"), "kube-api-access-xxxxx"),
    (re.compile(r"\b[0-9a-f]{64}\b"), "<container>"),
]


def _normalise(obj, host_cgroup):
    if isinstance(obj, dict):
        return {k: _normalise(v, host_cgroup) for k, v in obj.items()}
    if isinstance(obj, list):
        return sorted((_normalise(v, host_cgroup) for v in obj), key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, str):
        if obj == host_cgroup:
            return "<host cgroup>"
        for rx, to in _NORMALISE:
            obj = rx.sub(to, obj)
    return obj


def test_report_snapshot(shop_seen):
    """The whole report (JSON, and the table and markdown made of it) on a
    fixed scenario, times, random names and ids normalised. Refresh with
    TAPIO_UPDATE_SNAPSHOTS=1 after a deliberate change."""
    from tapio_node.report.render import render

    cfg = shop_seen[0]
    rep = report(cfg, "--since", "0s", "--object", "shop/web-tls")
    norm = _normalise(rep, host.cgroup_v2_path(host.proc_cgroup(os.getpid())))
    text = (json.dumps(norm, indent=2, sort_keys=True) + "\n"
            + render(norm, "table", "tapio-node report", summary=True, width=140)
            + render(norm, "markdown", "tapio-node report", summary=True))
    path = os.path.join(SNAPSHOTS, "report.txt")
    if os.environ.get("TAPIO_UPDATE_SNAPSHOTS") == "1":
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert text == f.read()
    # And the CLI's own table fits the terminal it is given.
    out = report(cfg, "--since", "0s", fmt="table")
    assert max(len(line) for line in out.splitlines()) <= 140
    assert report(cfg, "readers", "--since", "1h", fmt="markdown").startswith("# tapio-node report")


# The daemon inside test_journald's private namespace (its own journald on
# a tmpfs /run, its own network namespace, so lo is brought up for
# /healthz); the readers run out here, BPF sees them all the same.
DAEMON_IN_JOURNAL_NS = r"""
ip link set lo up
"$PY" -m tapio_node run --config "$CFG" --output none 2>"$T/daemon.stderr" &
D=$!
i=0
until "$PY" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=1)" "$HEALTHZ" 2>/dev/null; do
  i=$((i+1)); [ "$i" -lt 600 ] || { kill "$D"; echo "daemon not ready" >&2; cat "$T/daemon.stderr" >&2; exit 4; }
  kill -0 "$D" || { echo "daemon exited" >&2; cat "$T/daemon.stderr" >&2; exit 4; }
  sleep 0.1
done
touch "$T/ready"
until [ -e "$T/done" ]; do kill -0 "$D" || exit 5; sleep 0.1; done
kill -TERM "$D"; wait "$D"
"""


def test_new_reader_alert_is_one_journald_record_at_warning(sim_node, daemon_factory, tmp_path):
    import shutil

    from test_journald import JOURNALD, finish_namespace, new_journal_dir, read_journal, start_namespace
    from tapio_node.store.alerts import NEW_READER_MESSAGE_ID

    if not os.access(JOURNALD, os.X_OK) or shutil.which("journalctl") is None:
        pytest.skip(f"requires {JOURNALD} and journalctl (apt install systemd)")
    web = _shop(sim_node)
    snoop = sim_node.add_pod("batch", "snoop", [], static=True)
    sctr = snoop.add_container("main")
    cfg = sim_node.write_config(learning_period="0s")
    import yaml

    with open(cfg) as f:
        listen = yaml.safe_load(f)["kernel_collector"]["listen_address"]
    t = new_journal_dir(tmp_path)
    proc = start_namespace(t, DAEMON_IN_JOURNAL_NS,
                           env=dict(os.environ, CFG=cfg, HEALTHZ=f"http://{listen}/healthz"))
    try:
        deadline = time.monotonic() + 60 * SLOWDOWN
        while not (t / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        for _ in range(3):
            sctr.start_reader(web.volume_dir("certs") + "/tls.key", mounts={}, comm="snoop").wait()
        wait_report(cfg, lambda r: any(o["name"] == "web-tls" and o["reads"] == 3 for o in r["readers"]),
                    "readers", "--since", "1h")
    finally:
        (t / "done").touch()
        finish_namespace(t, proc)
    recs = read_journal(t, [f"MESSAGE_ID={NEW_READER_MESSAGE_ID}"])
    assert len(recs) == 1, recs
    (rec,) = recs
    assert rec["PRIORITY"] == "4"
    assert (rec["TAPIO_NAMESPACE"], rec["TAPIO_CONFIG_NAME"], rec["TAPIO_OBJECT_KIND"]) == \
        ("shop", "web-tls", "secret")
    assert (rec["TAPIO_ACCESSOR_NAMESPACE"], rec["TAPIO_ACCESSOR_WORKLOAD"], rec["TAPIO_PROCESS_COMM"]) == \
        ("batch", f"Pod/{snoop.name}", "snoop")
    assert rec["MESSAGE"].startswith(f"new reader: workload batch/Pod/{snoop.name} read secret shop/web-tls")


def test_an_empty_state_path_runs_without_a_store(sim_node, daemon_factory):
    web = _shop(sim_node)
    ctr = web.add_container("nginx")
    cfg = sim_node.write_config(state_path="")
    d = daemon_factory(cfg)
    s = ctr.start_reader("/run/secrets/certs/tls.crt", comm="nginx").wait()
    assert d.wait_events(1, pred=lambda e: e["process"]["pid"] == s["pid"])
    assert "kernel_monitor_store_up" not in d.get("/metrics")[1].decode()
    assert json.loads(d.get("/healthz")[1])["store"] == "off"
    r = report(cfg, check=False)
    assert r.returncode == 1 and "state_path is empty" in r.stderr
    assert not os.path.exists(os.path.join(sim_node.base_dir, "var/lib/tapio-node"))


def test_report_as_a_user_says_the_store_is_root_only(sim_node, daemon_factory, as_nobody):
    cfg = sim_node.write_config()
    daemon_factory(cfg)   # makes the state dir, 0700
    for d in (sim_node.base_dir, os.path.join(sim_node.base_dir, "var"), os.path.join(sim_node.base_dir, "var/lib")):
        os.chmod(d, 0o755)   # as /var/lib is: only the state dir is closed
    import shutil
    import tempfile

    top = tempfile.mkdtemp(prefix="tapio-test-report-")   # pytest's tmp_path is root-only
    try:
        os.chmod(top, 0o755)
        public = os.path.join(top, "config.yaml")
        shutil.copy(cfg, public)
        os.chmod(public, 0o644)
        r = subprocess.run(as_nobody("-m", "tapio_node", "report", "--config", public),
                           capture_output=True, text=True, timeout=120, cwd="/")
    finally:
        shutil.rmtree(top)
    assert r.returncode == 1 and "permission denied" in r.stderr and "as root" in r.stderr, r.stderr
