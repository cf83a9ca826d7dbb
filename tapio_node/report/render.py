"""The report in its three formats: json (the contract), a table that
fits the terminal, markdown (for tickets and reviews)."""
from __future__ import annotations

import json
import shutil

# Rows shown per section in the summary (no SECTION given), table/markdown.
SUMMARY_ROWS = 10

TITLES = {
    "unused": "Mounted and never read by their pods (dead config)",
    "readers": "Who reads what",
    "least_privilege": "Secrets and tokens mounted but never read (least privilege)",
    "cross_pod": "Reads of another pod's volume, and host reads",
    "blast_radius": "Blast radius: who is affected by changing it",
    "top": "Most read objects",
    "new": "New readers",
}
EMPTY = {
    "unused": "every mounted ConfigMap and Secret key was read",
    "readers": "no reads recorded in the window",
    "least_privilege": "every mounted Secret and token was read",
    "cross_pod": "no cross-pod or host reads",
    "blast_radius": "nobody read or mounts it",
    "top": "no reads recorded in the window",
    "new": "no new (reader, object) pairs in the window",
}


def who(r: dict) -> str:
    """A reader as one word: ns/workload, host:<cgroup or command>, kubelet."""
    if r["kind"] == "pod":
        return f"{r.get('namespace') or '?'}/{r.get('workload') or r.get('pod') or '?'}"
    if r["kind"] == "kubelet":
        return "kubelet"
    return "host:" + (r.get("host_cgroup") or r.get("workload") or r.get("command") or "?")


def _short(ts: str | None) -> str:
    return ts.replace("T", " ").rstrip("Z")[:16] if ts else "-"


def _cid(c: str | None) -> str:
    return c[:12] if c else "-"


def rows_of(section: str, items: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Column names and cell text of a section's table (unknowns as "-")."""
    header, rows = _rows_of(section, items)
    return header, [["-" if c is None else str(c) for c in r] for r in rows]


def _rows_of(section: str, items: list[dict]) -> tuple[list[str], list[list]]:
    if section == "unused":
        return (["NAMESPACE", "WORKLOAD", "KIND", "NAME", "VOLUME", "KEY", "MOUNTED SINCE"],
                [[i["namespace"], i["workload"] or i["pod"], i["kind"], i["name"], i["volume"],
                  i["key"] if i["key"] is not None else "(whole object)",
                  _short(i["mounted_since"]) if i["mounted_since"] else ",".join(i.get("nodes", ()))]
                 for i in items])
    if section == "readers":
        out = []
        for o in items:
            for n, r in enumerate(o["readers"]):
                head = [o["namespace"], o["kind"], o["name"], str(o["reads"])] if n == 0 else ["", "", "", ""]
                out.append(head + [who(r), _cid(r["container"]), r["command"], str(r["count"]),
                                   _short(r["last_read"])])
        return ["NAMESPACE", "KIND", "NAME", "READS", "READER", "CONTAINER", "COMMAND", "COUNT", "LAST READ"], out
    if section == "least_privilege":
        return (["NAMESPACE", "WORKLOAD", "KIND", "NAME", "VOLUME", "SUGGESTION"],
                [[i["namespace"], i["workload"] or i["pod"], i["kind"], i["name"], i["volume"],
                  i["suggestion"]] for i in items])
    if section == "cross_pod":
        return (["OWNER", "KIND", "NAME", "KEY", "READER", "COMMAND", "COUNT", "LAST READ"],
                [[f"{i['owner']['namespace']}/{i['owner']['pod'] or '*'}", i["kind"], i["name"], i["key"] or "-",
                  who(i["accessor"]) + (" (other namespace)" if i["cross_namespace"] else ""),
                  i["accessor"]["command"], str(i["count"]), _short(i["last_read"])] for i in items])
    if section == "blast_radius":
        out = []
        for o in items:
            for r in o["readers"]:
                out.append([o["kind"], o["name"], "reads", who(r), str(r["pods"]), str(r["count"]),
                            _short(r["last_read"])])
            for m in o["mounted_by"]:
                out.append([o["kind"], o["name"], "mounts", m["workload"] or "?", str(m["pods"]), "-",
                            _short(m["last_mounted"])])
        return ["KIND", "NAME", "HOW", "WHO", "PODS", "READS", "LAST"], out
    if section == "top":
        return (["NAMESPACE", "KIND", "NAME", "READS", "READERS", "LAST READ"],
                [[i["namespace"], i["kind"], i["name"], str(i["reads"]), str(i["readers"]),
                  _short(i["last_read"])] for i in items])
    if section == "new":
        return (["READER", "NAMESPACE", "KIND", "NAME", "FIRST SEEN", "COUNT"],
                [[who(i["accessor"]), i["namespace"], i["kind"], i["name"], _short(i["first_seen"]),
                  str(i["count"])] for i in items])
    raise ValueError(f"unknown section {section!r}")


def fit(widths: list[int], total: int, gap: int = 2) -> list[int]:
    """Shrink the widest columns until the row fits `total` characters."""
    widths = list(widths)
    while sum(widths) + gap * (len(widths) - 1) > total:
        i = max(range(len(widths)), key=widths.__getitem__)
        if widths[i] <= 6:
            break
        widths[i] -= 1
    return widths


def _cell(text: str, width: int) -> str:
    return text if len(text) <= width else text[:max(width - 1, 0)] + "…"


def table(section: str, items: list[dict], width: int | None = None, limit: int | None = None) -> str:
    header, rows = rows_of(section, items)
    title = TITLES[section]
    if not rows:
        return f"{title}\n  ({EMPTY[section]})\n"
    more = 0
    if limit is not None and len(rows) > limit:
        more, rows = len(rows) - limit, rows[:limit]
    width = width or shutil.get_terminal_size((120, 24)).columns
    widths = fit([max(len(r[i]) for r in [header, *rows]) for i in range(len(header))], width - 2)
    lines = [title]
    for r in [header, *rows]:
        lines.append("  " + "  ".join(_cell(c, w).ljust(w) for c, w in zip(r, widths)).rstrip())
    if more:
        lines.append(f"  ... {more} more (tapio-node report {section.replace('_', '-')})")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(section: str, items: list[dict], limit: int | None = None) -> str:
    header, rows = rows_of(section, items)
    out = [f"## {TITLES[section]}", ""]
    if not rows:
        return "\n".join(out + [f"_{EMPTY[section]}_", ""])
    more = 0
    if limit is not None and len(rows) > limit:
        more, rows = len(rows) - limit, rows[:limit]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + "|".join("---" for _ in header) + "|")
    out += ["| " + " | ".join(_md(c) for c in r) + " |" for r in rows]
    if more:
        out += ["", f"_{more} more: `tapio-node report {section.replace('_', '-')}`_"]
    return "\n".join(out + [""])


def render(result: dict, fmt: str, header: str, summary: bool, width: int | None = None) -> str:
    if fmt == "json":
        return json.dumps(result, indent=2, sort_keys=False) + "\n"
    limit = SUMMARY_ROWS if summary else None
    if fmt == "markdown":
        return "\n".join([f"# {header}", ""] + [markdown(s, items, limit) for s, items in result.items()])
    return "\n".join([header] + [table(s, items, width, limit) for s, items in result.items()])
