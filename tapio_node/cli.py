"""tapio-node command line."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from tapio_node import __version__

DESCRIPTION = """\
Report which process in which pod opened which file of which ConfigMap,
Secret or projected volume on this Kubernetes node. Opens are matched in
the kernel (eBPF) by the inode of the file opened, so in-container paths,
symlinked keys, relative paths and open/openat/openat2 are all seen.
"""

EPILOG = """\
examples:
  tapio-node run --config /etc/tapio-node/config.yaml --output journal
  tapio-node run --output stdout | jq 'select(.cross_pod)'
  journalctl -u tapio-node TAPIO_CONFIG_NAME=db-credentials -o json
  curl -s 127.0.0.1:9717/metrics | grep kernel_monitor_secret_access_total
  tapio-node report unused --since 30d
  tapio-node check
  tapio-node demo

exit status: 0 clean stop, 1 cannot run here (see `tapio-node check`),
2 bad configuration or usage.
"""


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", default=None,
                   help="YAML config with a top-level kernel_collector: key "
                        "(default: /etc/tapio-node/config.yaml if present, else built-in defaults)")


REPORT_DESCRIPTION = """\
Answer questions from what actually happened on this node, from the
daemon's access store (<state_path>/access.db, read-only: works while the
daemon runs). Without SECTION: a summary of every section.

sections:
  unused            ConfigMaps/Secrets and keys mounted for at least --since and
                    never read by their pods, per workload (dead config)
  readers           per object: which workloads, containers, host units and the
                    kubelet read it, how often, when last (--object to pick one)
  least-privilege   workloads that mount a Secret or service-account token they
                    never read, with the pod-spec change that drops it
  cross-pod         reads of another pod's volume, host reads, cross-namespace
  blast-radius      who reads (and mounts) --object NAMESPACE/NAME: who is
                    affected by changing it
  top               the most read objects
  new               (reader workload, object) pairs first seen within --since
"""

REPORT_EPILOG = """\
examples:
  tapio-node report
  tapio-node report unused --since 30d
  tapio-node report blast-radius --object shop/web-tls
  tapio-node report --format json | jq '.least_privilege[].suggestion'
  tapio-node report --prometheus http://prometheus:9090 unused

--format json prints one object with one key per section (unused, readers,
least_privilege, cross_pod, blast_radius, top, new); see tapio-node(8),
REPORT JSON. Exit status 0, 1 when the store cannot be read, 2 bad usage.
"""


def _add_report(sub) -> None:
    from tapio_node.report.queries import SECTIONS

    rep = sub.add_parser("report", help="answers from the access store: unused config, readers, "
                                        "least privilege, cross-pod reads, blast radius, top, new",
                         description=REPORT_DESCRIPTION, epilog=REPORT_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config(rep)
    rep.add_argument("section", nargs="?", choices=list(SECTIONS), metavar="SECTION",
                     help="one of: " + ", ".join(SECTIONS) + " (default: all)")
    rep.add_argument("--since", default="7d", metavar="DURATION",
                     help="the window: 30s, 10m, 24h, 7d, 2w; 0 for everything the store "
                          "holds (default: 7d)")
    rep.add_argument("--format", "-f", choices=["table", "json", "markdown"], default="table",
                     help="table (fits the terminal), json (the contract in tapio-node(8)), "
                          "markdown (default: table)")
    rep.add_argument("--object", metavar="NAMESPACE/NAME",
                     help="the ConfigMap or Secret for readers and blast-radius")
    rep.add_argument("--limit", type=int, default=20, metavar="N",
                     help="objects in top (default: 20)")
    rep.add_argument("--prometheus", metavar="URL",
                     help="answer unused, readers and cross-pod for the whole cluster from this "
                          "Prometheus server's HTTP API instead of this node's store")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tapio-node", description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"tapio-node {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("TAPIO_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"],
                        help="daemon log verbosity on stderr (default: info)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser(
        "run", help="run the collector (the daemon)",
        description="Load the BPF programs, index every watched volume under "
                    "kubelet_pods_path, then report each access until SIGTERM/Ctrl-C. "
                    "Serves /metrics and /healthz on listen_address. SIGHUP reloads the config.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config(run)
    run.add_argument("--output", "-o", choices=["stdout", "journal", "none"], default="stdout",
                     help="stdout: one JSON object per line per access; journal: folded "
                          "structured records in journald; none: Prometheus metrics only "
                          "(default: stdout)")

    check = sub.add_parser(
        "check", help="probe the kernel and node; say what is missing and how to fix it",
        description="One line per requirement with its state and the fix. Exit status 1 "
                    "when the daemon could not run here.")
    _add_config(check)

    _add_report(sub)

    demo = sub.add_parser(
        "demo", help="run against a simulated node (no cluster needed)",
        description="Build a simulated kubelet tree in a temp dir (pods with ConfigMap, "
                    "Secret and projected volumes, secret volumes on tmpfs, pod processes "
                    "in their own mount namespaces and cgroups reading their volumes "
                    "through in-container paths), run the collector against it and show "
                    "the events live. Everything it creates is removed on exit or Ctrl-C.")
    demo.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                      help="stop after this long (default: until Ctrl-C)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="tapio-node: %(levelname)s: %(message)s", stream=sys.stderr)
    if args.command == "run":
        from tapio_node.daemon import run

        return run(args.config, args.output)
    if args.command == "check":
        from tapio_node import check

        return check.main(args.config)
    if args.command == "report":
        from tapio_node.report import main as report_main

        return report_main(args)
    if args.command == "demo":
        from tapio_node.sim.demo import run_demo

        return run_demo(duration=args.duration) or 0
    parser.print_help(sys.stderr)
    return 2
