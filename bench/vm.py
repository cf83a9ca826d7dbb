"""`make vmbench KERNEL=6.12 BACKENDS="tracepoint fentry lsm"`: the micro
benchmark (open_unw, read_wat, getpid) inside a VM booted on a Debian
kernel, the baseline and one daemon per hook backend interleaved in the
same rounds on the same VM.

    python -m bench.vm [--kernel 6.12] [--backends "tracepoint fentry lsm"] [--rounds N]

The guest boots with bpf among its LSMs (lsm=...,bpf), so every backend can
be forced there. TCG inflates absolute times: the
ratios to the VM's own baseline are the figures. Results land in
.cache/vm-bench/<kernel>/ (latest.json, latest.md) and the table is printed.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys

from tests.vm import kernels, matrix

REPO = kernels.REPO_ROOT
# Only the per-syscall figures: the others measure Python, not the hook.
SKIP = "bpftrace,auditd,sampling,latency,race,startup,throughput,storm,overflow,mounts"


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.vm", description=__doc__.splitlines()[0])
    p.add_argument("--kernel", default=os.environ.get("KERNEL") or "6.12",
                   help="kernel to boot: " + ", ".join(kernels.BY_NAME) + " (default 6.12)")
    p.add_argument("--backends", default=os.environ.get("BACKENDS") or "tracepoint fentry lsm")
    p.add_argument("--rounds", type=int, default=int(os.environ.get("ROUNDS") or 3))
    p.add_argument("--timeout", type=float, default=3600)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("error: the benchmark needs root", file=sys.stderr)
        return 2
    try:
        (k,) = kernels.select(args.kernel)
        kernels.fetch(k, log=matrix.say)
    except (kernels.FetchError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    backends = args.backends.replace(",", " ").split()
    out = os.path.join(REPO, ".cache", "vm-bench", k.name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    mode = matrix.accel(k, log=matrix.say)
    py = os.path.join(REPO, ".venv", "bin", "python")
    bench = [py, "-m", "bench", "--quick", "--rounds", str(args.rounds), "--backends", " ".join(backends),
             "--skip", SKIP, "--results-dir", out]
    # The guest sees this machine's files: a private /tmp, and the kernel
    # filesystems the daemon needs.
    command = " && ".join([
        "mount -t tmpfs -o mode=1777 tmpfs /tmp",
        "(mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing)",
        "(mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf)",
        f"cd {shlex.quote(REPO)}",
        " ".join(shlex.quote(a) for a in bench)])
    argv = matrix.vng_argv(k, mode, out, command, memory="4G",
                           append=matrix.LSM_APPEND if "lsm" in backends else "")
    console = os.path.join(out, "console.log")
    matrix.say(f"{k.name}: booting {k.release} ({mode.upper()}), benchmarking {', '.join(backends)}")
    rc = matrix.run_logged(argv, args.timeout, console)
    latest = os.path.join(out, "latest.md")
    if os.path.exists(latest):
        with open(latest) as f:
            print(f.read())
    print(f"results: {os.path.relpath(out, REPO)} (console.log, latest.json, latest.md)")
    return 0 if rc == 0 and os.path.exists(latest) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
