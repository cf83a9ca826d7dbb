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
  tapio-node check
  tapio-node demo

exit status: 0 clean stop, 1 cannot run here (see `tapio-node check`),
2 bad configuration or usage.
"""


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", metavar="FILE", default=None,
                   help="YAML config with a top-level kernel_collector: key "
                        "(default: /etc/tapio-node/config.yaml if present, else built-in defaults)")


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
    if args.command == "demo":
        from tapio_node.sim.demo import run_demo

        return run_demo(duration=args.duration) or 0
    parser.print_help(sys.stderr)
    return 2
