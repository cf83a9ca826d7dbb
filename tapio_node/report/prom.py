"""`tapio-node report --prometheus URL`: unused, readers and cross-pod for the
whole cluster, from the per-node metrics every daemon exports, through the
Prometheus HTTP API (/api/v1/query). Same JSON shapes as the node report;
what only a node's store knows (pod, container, command, key) is null."""
from __future__ import annotations

import json
import sys
import urllib.error
import urllib.parse
import urllib.request

from tapio_node.report.queries import DEAD_CONFIG_KINDS, Window, reader, rfc3339
from tapio_node.report.render import render

SECTIONS = ("unused", "readers", "cross-pod")
_READ_LABELS = "namespace, kind, name, reader_kind, reader_namespace, reader_workload, cross_pod"


class PrometheusError(Exception):
    pass


def query(url: str, expr: str, timeout: float = 30.0) -> list[dict]:
    """An instant query's result vector."""
    full = url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(full, timeout=timeout) as resp:
            body = json.load(resp)
    except urllib.error.HTTPError as exc:
        raise PrometheusError(f"{url}: HTTP {exc.code} for {expr!r}: {exc.read()[:300].decode(errors='replace')}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise PrometheusError(f"cannot query {url}: {getattr(exc, 'reason', exc)}")
    if body.get("status") != "success":
        raise PrometheusError(f"{url}: {body.get('errorType')}: {body.get('error')}")
    return body["data"]["result"]


def _value(sample: dict) -> float:
    return float(sample["value"][1])


def _reads(url: str, w: Window) -> list[tuple[dict, float]]:
    series = "kernel_monitor_object_reads_total"
    inner = f"increase({series}[{int(w.since)}s])" if w.since > 0 else series
    return [(s["metric"], _value(s)) for s in query(url, f"sum by ({_READ_LABELS}) ({inner})")
            if _value(s) > 0]


def _last_reads(url: str) -> dict[tuple, float]:
    return {(m["namespace"], m["kind"], m["name"]): v for m, v in
            ((s["metric"], _value(s)) for s in query(
                url, "max by (namespace, kind, name) (kernel_monitor_last_access_timestamp_seconds)"))}


# Every automounted kube-api-access volume carries it: the node report
# leaves those volumes to least-privilege, and so does the cluster view.
INJECTED_CONFIGMAP = "kube-root-ca.crt"


def unused(url: str, w: Window) -> list[dict]:
    """Objects mounted on some node now and read on none within the window
    (by anyone: per-node metrics do not tell the owner pod's reads apart)."""
    kinds = "|".join(DEAD_CONFIG_KINDS)
    nodes: dict[tuple, list[str]] = {}
    sel = f'kind=~"{kinds}",name!="{INJECTED_CONFIGMAP}"'
    for s in query(url, f"max by (namespace, kind, name, instance) (kernel_monitor_volume_mounted{{{sel}}})"):
        m = s["metric"]
        nodes.setdefault((m["namespace"], m["kind"], m["name"]), []).append(m.get("instance", ""))
    last = _last_reads(url)
    out = []
    for (ns, kind, name), where in sorted(nodes.items()):
        seen = last.get((ns, kind, name))
        if seen is not None and (w.since == 0 or seen >= w.cutoff):
            continue
        out.append({"namespace": ns, "pod": None, "workload": None, "kind": kind, "name": name,
                    "volume": None, "key": None, "mounted_since": None, "nodes": sorted(where),
                    "last_read": rfc3339(seen)})
    return out


def _reader(m: dict, count: int) -> dict:
    host = m.get("reader_kind") == "host"
    return reader(m.get("reader_kind", ""), m.get("reader_namespace"), m.get("reader_workload"), None, None,
                  m.get("reader_workload") if host else None, None, count, None)


def readers(url: str, w: Window) -> list[dict]:
    last = _last_reads(url)
    out: dict[tuple, dict] = {}
    for m, v in _reads(url, w):
        obj = (m["namespace"], m["kind"], m["name"])
        if w.object is not None and (obj[0], obj[2]) != w.object:
            continue
        o = out.setdefault(obj, {"namespace": obj[0], "kind": obj[1], "name": obj[2], "reads": 0,
                                 "last_read": rfc3339(last.get(obj)), "readers": []})
        o["reads"] += round(v)
        o["readers"].append(_reader(m, round(v)))
    for o in out.values():
        o["readers"].sort(key=lambda r: -r["count"])
    return [out[k] for k in sorted(out)]


def cross_pod(url: str, w: Window) -> list[dict]:
    out = []
    for m, v in _reads(url, w):
        if m.get("cross_pod") != "true":
            continue
        acc = _reader(m, round(v))
        out.append({"owner": {"namespace": m["namespace"], "pod": None, "workload": None},
                    "kind": m["kind"], "name": m["name"], "key": None, "accessor": acc,
                    "count": round(v), "last_read": None,
                    "cross_namespace": acc["kind"] == "pod" and (acc["namespace"] or "") != m["namespace"]})
    return sorted(out, key=lambda c: (-c["count"], c["owner"]["namespace"], c["name"]))


_FUNCS = {"unused": ("unused", unused), "readers": ("readers", readers), "cross-pod": ("cross_pod", cross_pod)}


def main(args, window: Window) -> int:
    if args.section is not None and args.section not in _FUNCS:
        print(f"tapio-node report: --prometheus answers {', '.join(SECTIONS)}; {args.section} needs a "
              "node's store (run it on the node, without --prometheus)", file=sys.stderr)
        return 2
    names = [args.section] if args.section else list(_FUNCS)
    try:
        result = {_FUNCS[n][0]: _FUNCS[n][1](args.prometheus, window) for n in names}
    except PrometheusError as exc:
        print(f"tapio-node report: {exc}", file=sys.stderr)
        return 1
    header = f"tapio-node report: the cluster, from {args.prometheus}, last {args.since}"
    sys.stdout.write(render(result, args.format, header, summary=args.section is None))
    return 0
