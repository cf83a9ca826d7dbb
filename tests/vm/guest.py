"""Runs inside a matrix VM (tests/vm/matrix.py boots it): prepares the guest,
loads the daemon's BPF object the way the daemon does, runs the named tests,
and leaves summary.json and junit.xml in --out (a dir the host made writable).

    python -m tests.vm.guest --out DIR [--env KEY=VALUE]... -- PYTEST_ARGS...
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _mount(fstype: str, target: str) -> None:
    with open("/proc/self/mounts") as f:
        if any(line.split()[1] == target and line.split()[2] == fstype for line in f):
            return
    os.makedirs(target, exist_ok=True)
    subprocess.run(["mount", "-t", fstype, fstype, target], check=True)


def load_report() -> dict:
    """What the daemon's loader makes of this kernel."""
    from tapio_node.kernel.loader import Kernel

    kernel = Kernel(pod_correlation=True)
    try:
        return {"programs": kernel.programs(), "backend": kernel.backend,
                "path_source": kernel.path_source,
                "features_off": [f.describe() for f in kernel.features_off()]}
    finally:
        kernel.close()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.vm.guest")
    p.add_argument("--out", required=True)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="set in the tests' environment")
    p.add_argument("--private-tmp", action="store_true",
                   help="mount an empty /tmp first (only inside a VM)")
    p.add_argument("pytest_args", nargs="*")
    args = p.parse_args(argv)
    summary: dict = {"release": os.uname().release}
    t0 = time.monotonic()
    try:
        _mount("tracefs", "/sys/kernel/tracing")
        _mount("bpf", "/sys/fs/bpf")
        if args.private_tmp:
            # A VM sees the host's files: its /tmp holds the host's live test
            # nodes, which look stale there (their pids are not in the guest).
            # Never on the host itself: it would hide the host's /tmp.
            subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=1777,size=75%", "tmpfs", "/tmp"], check=True)
        summary.update(load_report())
    except Exception as exc:  # the table shows it; the tests then say more
        summary["load_error"] = f"{type(exc).__name__}: {exc}"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", TAPIO_REQUIRE_KERNEL="1")
    env.update(kv.split("=", 1) for kv in args.env)
    junit = os.path.join(args.out, "junit.xml")
    run = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-ra", "-q",
                          f"--junitxml={junit}", *args.pytest_args], env=env)
    summary["pytest_rc"] = run.returncode
    summary["seconds_in_guest"] = round(time.monotonic() - t0, 1)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f)
    return run.returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
