"""The cluster view: a real Prometheus server (Debian's `prometheus`)
scrapes three daemons on three simulated nodes on this machine, each with
its own port, pin path and state path; `tapio-node report --prometheus`
then answers unused, readers and cross-pod for all three, and the
dashboard's and rules' queries run against the real server."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from harness import SLOWDOWN, daemon_factory  # noqa: F401  (fixture)
from tapio_node.sim.node import VolumeSpec
from tapio_node.sim.system import terminate

pytestmark = pytest.mark.kernel

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMETHEUS = shutil.which("prometheus") or ("/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prom_query(url, expr):
    q = urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=10) as resp:
        body = json.load(resp)
    assert body["status"] == "success", body
    return body["data"]["result"]


def report(url, *args, fmt="json"):
    r = subprocess.run([sys.executable, "-m", "tapio_node", "report", "--prometheus", url, "--format", fmt,
                        *args], capture_output=True, text=True, timeout=60, env=dict(os.environ, COLUMNS="140"))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout) if fmt == "json" else r.stdout


@pytest.fixture
def prometheus(tmp_path):
    """start(targets: {node name: host:port}) -> the server's URL; stopped after the test."""
    procs = []

    def start(targets):
        web = f"127.0.0.1:{free_port()}"
        cfg = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
               "rule_files": [os.path.join(REPO, "deploy", "prometheus", "tapio-node.rules.yaml")],
               "scrape_configs": [{"job_name": "tapio-node", "static_configs": [
                   {"targets": [addr], "labels": {"instance": node}} for node, addr in targets.items()]}]}
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(cfg))
        log = open(tmp_path / "prometheus.log", "wb")
        procs.append(subprocess.Popen([PROMETHEUS, f"--config.file={path}", f"--storage.tsdb.path={tmp_path / 'data'}",
                                       f"--web.listen-address={web}"], stdout=subprocess.DEVNULL, stderr=log))
        return f"http://{web}"

    yield start
    for p in procs:
        terminate(p, timeout=60)


def wait_for(fn, timeout=90.0):
    """fn() once it is truthy (a bound for failure, not an assertion on speed)."""
    deadline = time.monotonic() + timeout * SLOWDOWN
    while True:
        try:
            got = fn()
        except OSError:
            got = None
        if got or time.monotonic() >= deadline:
            return got
        time.sleep(0.5)


@pytest.mark.skipif(PROMETHEUS is None, reason="requires the prometheus server (apt install prometheus)")
def test_three_nodes_through_a_real_prometheus(sim_node_factory, daemon_factory, prometheus):
    nodes = {n: sim_node_factory(node_name=n) for n in ("node-a", "node-b", "node-c")}
    a, b, c = nodes.values()
    # web runs on node-a and node-b (both mount web-tls, only a's reads it);
    # db-credentials is mounted on node-b only and read nowhere; on node-c
    # a host process reads a pod's secret and batch/snoop reads shop's.
    web_a = a.add_pod("shop", "web", [VolumeSpec("secret", "certs", {"tls.crt": b"C"}, source_name="web-tls")],
                      static=True)
    b.add_pod("shop", "web", [VolumeSpec("secret", "certs", {"tls.crt": b"C"}, source_name="web-tls"),
                              VolumeSpec("secret", "db", {"password": b"p"}, source_name="db-credentials")],
              static=True)
    api = c.add_pod("shop", "api", [VolumeSpec("secret", "keys", {"k": b"k"}, source_name="api-keys")], static=True)
    snoop = c.add_pod("batch", "snoop", [], static=True)
    daemons = {}
    for name, node in nodes.items():
        cfg = node.write_config()
        daemons[name] = daemon_factory(cfg)
    assert len({d.listen for d in daemons.values()}) == 3
    assert len({d.config["pin_path"] for d in daemons.values()}) == 3
    assert len({d.config["state_path"] for d in daemons.values()}) == 3
    web_a.add_container("nginx").start_reader("/run/secrets/certs/tls.crt", count=4, comm="nginx").wait()
    api.add_container("main").start_reader("/run/secrets/keys/k", count=2, comm="api").wait()
    snoop.add_container("main").start_reader(api.volume_dir("keys") + "/k", mounts={}, comm="snoop").wait()
    c.start_host_reader(api.volume_dir("keys") + "/k", comm="backup").wait()

    url = prometheus({name: d.listen for name, d in daemons.items()})
    up = wait_for(lambda: len([s for s in prom_query(url, "up == 1")]) == 3)
    assert up, "Prometheus never scraped all three daemons"
    reads = 'sum(kernel_monitor_object_reads_total{kind="secret"})'
    assert wait_for(lambda: [s for s in prom_query(url, reads) if float(s["value"][1]) == 8]), \
        prom_query(url, reads)

    rep = report(url, "--since", "0")
    assert set(rep) == {"unused", "readers", "cross_pod"}
    unused = {(u["namespace"], u["kind"], u["name"]): u["nodes"] for u in rep["unused"]}
    # web-tls is read on node-a: used in the cluster though node-b never read it.
    assert unused == {("shop", "secret", "db-credentials"): ["node-b"]}
    readers = {(o["namespace"], o["name"]): o for o in rep["readers"]}
    assert readers[("shop", "web-tls")]["reads"] == 4
    assert [(r["kind"], r["workload"], r["count"]) for r in readers[("shop", "web-tls")]["readers"]] == \
        [("pod", "Pod/web-node-a", 4)]
    keys = {(r["kind"], r["namespace"], r["workload"], r["count"]) for r in readers[("shop", "api-keys")]["readers"]}
    assert ("pod", "shop", "Pod/api-node-c", 2) in keys and ("pod", "batch", "Pod/snoop-node-c", 1) in keys
    assert any(k[0] == "host" and k[3] == 1 for k in keys)
    assert readers[("shop", "api-keys")]["last_read"].endswith("Z")
    cross = {(x["accessor"]["kind"], x["accessor"]["namespace"], x["name"], x["cross_namespace"])
             for x in rep["cross_pod"]}
    assert cross == {("pod", "batch", "api-keys", True), ("host", None, "api-keys", False)}
    # One section, and the other formats.
    only = report(url, "readers", "--object", "shop/web-tls", "--since", "0")
    assert [o["name"] for o in only["readers"]] == ["web-tls"]
    table = report(url, "unused", "--since", "0", fmt="table")
    assert "db-credentials" in table and max(len(x) for x in table.splitlines()) <= 140
    assert "db-credentials" in report(url, "--since", "0", fmt="markdown")
    r = subprocess.run([sys.executable, "-m", "tapio_node", "report", "--prometheus", url, "top"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "node's store" in r.stderr

    # The shipped rules evaluate on this data, and every dashboard query parses and runs.
    # (An evaluation from before every node was scraped may be the latest for a second.)
    names = lambda: {s["metric"]["name"] for s in prom_query(url, "tapio:secret_unused_7d")}  # noqa: E731
    wait_for(lambda: names() == {"db-credentials"})
    assert names() == {"db-credentials"}
    with open(os.path.join(REPO, "deploy", "grafana", "tapio-node.json")) as f:
        dash = json.load(f)
    for panel in dash["panels"]:
        for t in panel["targets"]:
            expr = t["expr"].replace("$namespace", ".*").replace("$__range", "1h")
            prom_query(url, expr)  # raises on a bad query
