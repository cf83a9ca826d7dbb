"""`make vmtest`: boot each Debian kernel in QEMU and run the kernel tests in it.

    python -m tests.vm.matrix [--kernels "5.10 6.1 6.12 7.2 host"] [--subset NAME]

KERNELS= (or --kernels) picks the rows; `host` is this machine's own kernel,
run without a VM; `6.1+fentry` boots 6.1 with an lsm= that leaves bpf out,
where the daemon must pick the fentry backend, `6.1+lsm` with one that
names bpf (plain 6.1 and 6.12 have bpf in their built-in LSM list: lsm). Each VM shares this machine's root filesystem copy-on-write
(virtme-ng), so the venv and the build are the ones under test; results come
back through one writable dir. Prints a table of kernel x programs loaded x
backend x tests passed/failed/skipped x seconds, and exits 1 when any row
failed. KVM is used where a guest really boots under it, TCG otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET

from tests.vm import kernels

REPO = kernels.REPO_ROOT
RESULTS = os.path.join(REPO, ".cache", "vm-results")

# The named subset each VM runs (the whole tests/kernel suite takes too long
# under TCG). Each entry covers one thing that differs between kernels.
SUBSETS = {
    "matrix": [
        "tests/kernel/test_compat.py",                       # load and attach, what is off
        "tests/kernel/test_spine.py",                        # symlinked path, each syscall,
                                                             # open_by_handle_at, dirfd, relative,
                                                             # enter-stash, healthz, bpftool
        "tests/kernel/test_io_uring.py",                     # io_uring opens
        "tests/kernel/test_live.py::test_atomic_updates_raced_by_a_reader_miss_nothing",
        "tests/kernel/test_live.py::test_inode_reuse_is_never_misattributed",
        "tests/kernel/test_live.py::test_restart_keeps_attribution",
        "tests/kernel/test_live.py::test_cross_pod_reads",
        "tests/kernel/test_pods.py::test_real_bpf_maps",   # pod correlation
        "tests/kernel/test_api.py",                          # container_pids from the kernel
        "tests/kernel/test_enforcement.py",                  # audit everywhere, enforce on lsm
    ],
    # The .deb in a Debian 12 root booted with systemd-nspawn, under this kernel.
    "packaging": ["tests/packaging/test_deb.py"],
    "kernel": ["tests/kernel"],
}
# What a subset needs besides the tests: guest environment, network.
SUBSET_ENV = {"packaging": {"TAPIO_TEST_DEB": "1", "TAPIO_DEB_WORKDIR": "/tmp/tapio-deb",
                            "TAPIO_DEB_OFFLINE": "1"}}   # apt installs from what --prepare fetched
SUBSET_MEMORY = {"packaging": "4G"}   # the Debian root lives in the guest's overlay
DEB_GLOB = os.path.join(REPO, "packaging", "build", "tapio-node_*.deb")
SUBSET_NETWORK: set[str] = set()   # subsets whose guest needs a network
VM_MEMORY = "2G"
VM_CPUS = "2"
# How much longer the tests' waits are under TCG (emulated, and sharing
# this machine's cores with whatever else runs).
TCG_SLOWDOWN = "4"
KVM_PROBE_SECONDS = 60
# Row variants: name suffix -> kernel command line and the backend auto must
# pick. Debian 12's and 13's kernels list bpf in their built-in CONFIG_LSM,
# so their plain rows run lsm; +fentry boots them with an lsm= that leaves
# bpf out, +lsm with one that names it.
LSM_APPEND = "lsm=landlock,lockdown,yama,apparmor,bpf"
NO_BPF_LSM_APPEND = "lsm=landlock,lockdown,yama,apparmor"
VARIANTS = {"lsm": {"append": LSM_APPEND, "backend": "lsm"},
            "fentry": {"append": NO_BPF_LSM_APPEND, "backend": "fentry"}}
# Subsets a variant row runs (the packaging boot is the same on every variant).
VARIANT_SUBSETS = ("matrix", "kernel", "custom")
# The backend auto picks on each plain VM row: 5.10 has no bpf_task_pt_regs;
# the others boot with bpf among their LSMs (CONFIG_LSM).
PLAIN_BACKEND = {"5.10": "tracepoint", "6.1": "lsm", "6.12": "lsm", "7.2": "lsm"}


def split_row(row: str) -> tuple[str, str | None]:
    """'6.1+lsm' -> ('6.1', 'lsm'); '6.1' -> ('6.1', None)."""
    name, _, variant = row.partition("+")
    if variant and variant not in VARIANTS:
        raise kernels.FetchError(f"unknown row variant {variant!r} in {row!r}: choose from {', '.join(VARIANTS)}")
    return name, variant or None


def say(msg: str) -> None:
    print(msg, flush=True)


def _vng() -> str:
    found = shutil.which("vng", path=os.path.join(REPO, ".venv", "bin") + os.pathsep + os.environ.get("PATH", ""))
    if not found:
        raise SystemExit("error: vng (virtme-ng) not found: run `make venv` first")
    return found


def vng_argv(k: kernels.Kernel, mode: str, rwdir: str, command: str, *, memory: str = VM_MEMORY,
             append: str = "", network: bool = False) -> list[str]:
    """virtme-ng booting kernel k (mode "kvm" or "tcg") to run one shell
    command, with rwdir writable from the guest."""
    argv = [_vng(), "-r", kernels.image_path(k), "--memory", memory, "--cpus", VM_CPUS, "--rwdir", rwdir]
    if mode == "tcg":
        argv.insert(1, "--disable-kvm")
    if append:
        argv += ["--append", append]
    if network:
        argv += ["--network", "user"]
    return argv + ["--exec", command]


def _run_group(argv: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """Run argv in its own process group; on timeout end that group (by its pid)."""
    # vng calls virtme-run, which sits beside it in the venv.
    env = dict(os.environ, PATH=os.path.join(REPO, ".venv", "bin") + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.Popen(argv, start_new_session=True, env=env, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return subprocess.CompletedProcess(argv, -signal.SIGKILL, out, err)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def run_logged(argv: list[str], timeout: float, log_path: str) -> int:
    """Run argv in its own process group, its output to log_path and to our
    stdout, through a pipe: virtme reopens its stdout by path and would
    truncate a file we were redirected to. On timeout the group is ended."""
    env = dict(os.environ, PATH=os.path.join(REPO, ".venv", "bin") + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.Popen(argv, start_new_session=True, env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    timer = threading.Timer(timeout, lambda: os.killpg(proc.pid, signal.SIGKILL))
    timer.start()
    try:
        with open(log_path, "wb") as logf:
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                logf.write(chunk)
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        return proc.wait()
    finally:
        timer.cancel()


def _boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def accel(k: kernels.Kernel, log=say) -> str:
    """"kvm" if a guest really boots and runs a command under KVM here, else
    "tcg". Asked once per boot of this machine (a failed probe costs a minute)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg"
    memo = os.path.join(kernels.CACHE, "accel")
    try:
        with open(memo) as f:
            boot, answer = f.read().split()
        if boot == _boot_id():
            return answer
    except (OSError, ValueError):
        pass
    log(f"probing KVM: booting {k.name} under KVM (up to {KVM_PROBE_SECONDS} s)")
    run = _run_group([_vng(), "-r", kernels.image_path(k), "--memory", "1G",
                      "--exec", "echo tapio-kvm-ok"], KVM_PROBE_SECONDS,
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    answer = "kvm" if run.returncode == 0 and "tapio-kvm-ok" in (run.stdout or "") else "tcg"
    log(f"KVM {'works' if answer == 'kvm' else 'does not boot a guest here'}: using {answer.upper()}")
    os.makedirs(kernels.CACHE, exist_ok=True)
    with open(memo, "w") as f:
        f.write(f"{_boot_id()} {answer}\n")
    return answer


def _junit_counts(path: str) -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return counts
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def _failed_names(path: str) -> list[str]:
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return []
    return [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
            if c.find("failure") is not None or c.find("error") is not None]


def run_one(row: str, subset: str, append: str, timeout: float, log=say) -> dict:
    """One row: boot `row`'s kernel (or run on this machine for "host"), run the subset."""
    name, variant = split_row(row)
    tests = SUBSETS[subset]
    env = dict(SUBSET_ENV.get(subset, {}))
    if variant:
        append = " ".join(x for x in (append, VARIANTS[variant]["append"]) if x)
        env["TAPIO_EXPECT_BACKEND"] = VARIANTS[variant]["backend"]
    elif name in PLAIN_BACKEND and not append:
        env["TAPIO_EXPECT_BACKEND"] = PLAIN_BACKEND[name]
    if subset == "packaging":
        # Built here (the guest has no build dependencies and runs TCG); the
        # guest installs it into its Debian 12 root and boots that root.
        env["TAPIO_DEB"] = _deb(log)
    out = os.path.join(RESULTS, "-".join([row.replace("+", "-"), subset]
                                         + ([append.split("=")[0]] if append and not variant else [])))
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    guest = [sys.executable if name == "host" else os.path.join(REPO, ".venv", "bin", "python"),
             "-m", "tests.vm.guest", "--out", out,
             *[f"--env={k}={v}" for k, v in env.items()], "--", *tests]
    t0 = time.monotonic()
    console = os.path.join(out, "console.log")
    if name == "host":
        rc = run_logged(guest, timeout, console)
        mode = "none"
    else:
        k = kernels.BY_NAME[name]
        kernels.fetch(k, log=log)
        mode = accel(k, log=log)
        guest.insert(guest.index("--"), "--private-tmp")
        if mode == "tcg":
            guest.insert(guest.index("--"), f"--env=TAPIO_TEST_SLOWDOWN={TCG_SLOWDOWN}")
        argv = vng_argv(k, mode, out, " ".join(_quote(a) for a in guest),
                        memory=SUBSET_MEMORY.get(subset, VM_MEMORY), append=append,
                        network=subset in SUBSET_NETWORK)
        log(f"{name}: booting {k.release} ({mode.upper()}), running {len(tests)} test paths")
        rc = run_logged(argv, timeout, console)
    seconds = time.monotonic() - t0
    try:
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        summary = {"load_error": "no summary from the guest"
                   + (" (timed out)" if rc == -signal.SIGKILL else "")
                   + f"; see {os.path.relpath(console, REPO)}"}
    counts = _junit_counts(os.path.join(out, "junit.xml"))
    ok = rc == 0 and summary.get("pytest_rc") == 0 and counts["failed"] == 0 \
        and counts["passed"] > 0 and "load_error" not in summary
    return {"kernel": row, "subset": subset, "release": summary.get("release", ""), "accel": mode,
            "programs": len(summary.get("programs", [])), "backend": summary.get("backend", "-"),
            "path_source": summary.get("path_source", "-"), **counts, "seconds": round(seconds),
            "ok": ok, "features_off": summary.get("features_off", []),
            "load_error": summary.get("load_error"), "failed_tests": _failed_names(os.path.join(out, "junit.xml")),
            "results": os.path.relpath(out, REPO)}


def _deb(log) -> str:
    import glob

    # Always from this tree: a .deb left by an earlier build may be stale.
    log("building the .deb for the packaging test (make -C packaging deb)")
    build = subprocess.run(["make", "-C", os.path.join(REPO, "packaging"), "deb"],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if build.returncode:
        raise kernels.FetchError(f"make -C packaging deb failed:\n{build.stdout[-3000:]}")
    log("preparing the Debian 12 base root (tests/packaging/test_deb.py --prepare)")
    deb = sorted(glob.glob(DEB_GLOB), key=os.path.getmtime)[-1]
    prep = subprocess.run([sys.executable, os.path.join(REPO, "tests", "packaging", "test_deb.py"),
                           "--prepare"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          env=dict(os.environ, TAPIO_DEB=deb))
    if prep.returncode:
        raise kernels.FetchError(f"test_deb.py --prepare failed:\n{prep.stdout[-3000:]}")
    return deb


def _quote(arg: str) -> str:
    import shlex
    return shlex.quote(arg)


def table(rows: list[dict]) -> str:
    head = ["kernel", "subset", "release", "accel", "programs", "backend", "paths", "passed", "failed",
            "skipped", "seconds", "result"]
    body = [[r["kernel"], r["subset"], r["release"], r["accel"], str(r["programs"]), r["backend"], r["path_source"],
             str(r["passed"]), str(r["failed"]), str(r["skipped"]), str(r["seconds"]),
             "ok" if r["ok"] else "FAILED"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in [head, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for r in rows:
        for f in r["features_off"]:
            lines.append(f"  {r['kernel']}: off: {f}")
        if r["load_error"]:
            lines.append(f"  {r['kernel']}: {r['load_error']}")
        for t in r["failed_tests"]:
            lines.append(f"  {r['kernel']}: failed: {t}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.vm.matrix", description=__doc__.splitlines()[0])
    p.add_argument("--kernels", default=os.environ.get("KERNELS") or "5.10 6.1 6.12 7.2 host",
                   help="kernels to run: " + ", ".join([*kernels.BY_NAME, "host"]) + " (default: all)")
    p.add_argument("--subset", default=os.environ.get("VM_SUBSET", "matrix"),
                   help="which tests run in each VM, space separated: " + ", ".join(SUBSETS)
                        + " (default: matrix, the named subset)")
    p.add_argument("--tests", default=os.environ.get("VM_TESTS", ""),
                   help="pytest paths to run instead of a named subset (space separated)")
    p.add_argument("--append", default=os.environ.get("VM_APPEND", ""),
                   help="kernel command-line words for the guests, e.g. lsm=...,bpf")
    p.add_argument("--timeout", type=float, default=float(os.environ.get("VM_TIMEOUT", 1800)),
                   help="seconds per kernel before its VM is ended (default 1800)")
    args = p.parse_args(argv)
    names = args.kernels.replace(",", " ").split()
    try:
        kernels.select(" ".join(split_row(n)[0] for n in names if n != "host"))
    except kernels.FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("error: the kernel tests need root (run as root)", file=sys.stderr)
        return 2
    subsets = args.subset.replace(",", " ").split()
    if args.tests:
        SUBSETS["custom"] = args.tests.split()
        subsets = ["custom"]
    unknown = [x for x in subsets if x not in SUBSETS]
    if unknown:
        print(f"error: unknown subset {unknown[0]!r}: choose from {', '.join(SUBSETS)}", file=sys.stderr)
        return 2
    rows = []
    for name in names:
        for subset in subsets:
            if split_row(name)[1] and subset not in VARIANT_SUBSETS:
                continue   # e.g. packaging: the same boot on every variant
            try:
                rows.append(run_one(name, subset, args.append, args.timeout))
            except kernels.FetchError as exc:
                print(f"error: {name}: {exc}", file=sys.stderr)
                return 1
            print(table(rows[-1:]), flush=True)
    print("\n" + table(rows))
    with open(os.path.join(RESULTS, "matrix.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
