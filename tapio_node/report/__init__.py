"""`tapio-node report`: answers from the access store of this node (or, with
--prometheus, from the per-node metrics of the whole cluster)."""
from __future__ import annotations

import sqlite3
import sys
import time

from tapio_node.config import ConfigError, duration_seconds, load_config
from tapio_node.report import queries
from tapio_node.report.queries import SECTIONS, Window
from tapio_node.report.render import render

FORMATS = ("table", "json", "markdown")


def parse_object(text: str | None) -> tuple[str, str] | None:
    if text is None:
        return None
    ns, sep, name = text.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise ValueError(f"--object: expected NAMESPACE/NAME such as shop/web-tls, got {text!r}")
    return ns, name


def run_sections(conn, window: Window, section: str | None, limit: int) -> dict:
    """{json key: items} for one section, or every section (the summary;
    blast-radius only with --object)."""
    names = [section] if section else [s for s in SECTIONS if s != "blast-radius" or window.object]
    out = {}
    for name in names:
        key, fn = SECTIONS[name]
        out[key] = fn(conn, window, limit) if name == "top" else fn(conn, window)
    return out


def main(args) -> int:
    try:
        since = duration_seconds(args.since)
        obj = parse_object(args.object)
    except ValueError as exc:
        print(f"tapio-node report: {exc}", file=sys.stderr)
        return 2
    if args.section == "blast-radius" and obj is None:
        print("tapio-node report: blast-radius needs --object NAMESPACE/NAME", file=sys.stderr)
        return 2
    window = Window(since=since, now=time.time(), object=obj)
    if args.prometheus:
        from tapio_node.report import prom

        return prom.main(args, window)
    try:
        kc = load_config(args.config).kernel_collector
    except ConfigError as exc:
        print(f"tapio-node report: config error: {exc}", file=sys.stderr)
        return 2
    from tapio_node.store import StoreError, open_ro

    if not kc.state_path:
        print("tapio-node report: state_path is empty in the config: the daemon keeps no access store",
              file=sys.stderr)
        return 1

    try:
        conn = open_ro(kc.state_path)
    except StoreError as exc:
        print(f"tapio-node report: {exc}", file=sys.stderr)
        return 1
    try:
        with conn:
            result = run_sections(conn, window, args.section, args.limit)
            info = queries.store_info(conn)
    except sqlite3.Error as exc:
        print(f"tapio-node report: cannot read {kc.state_path}/access.db: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    header = (f"tapio-node report: node {info['node'] or '?'}, last {args.since}, store since "
              f"{info['created_at'] or '?'}, mounts as of {info['inventory_at'] or '?'}")
    sys.stdout.write(render(result, args.format, header, summary=args.section is None))
    return 0
