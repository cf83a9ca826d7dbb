"""python -m bench [--quick] — tapio-node side by side with nothing
attached, bpftrace and auditd, interleaved, medians over rounds.

Every round runs every configuration (in a rotated order), each measured
against the baseline of the same round. The auditd configurations run last,
in their own rounds with their own baseline: see bench/configs.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench import configs as C  # noqa: E402
from bench import bpfcost, report, scenarios  # noqa: E402

FULL = {"rounds": 5, "open_unw": 100_000, "read_wat": 100_000, "getpid": 1_000_000,
        "hammer": 1_000_000, "latency_rate": 1000, "latency_secs": 5, "race_secs": 5,
        "pods": 1000, "storm_secs": 10, "mounts": 3000}
QUICK = {"rounds": 2, "open_unw": 50_000, "read_wat": 50_000, "getpid": 500_000,
         "hammer": 200_000, "latency_rate": 1000, "latency_secs": 2, "race_secs": 3,
         "pods": 200, "storm_secs": 5, "mounts": 3000}
# auditd's watch costs ~80 us per watched open: fewer iterations, same ns/op
AUDIT_SCALE = 0.1
SKIPPABLE = ("bpftrace", "auditd", "sampling", "latency", "race", "startup", "throughput",
             "storm", "overflow", "mounts", "bpfcost")


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a ~2 minute smoke run")
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 5, quick 2)")
    p.add_argument("--pods", type=int, help="pods for the start-up figure (default 1000)")
    p.add_argument("--skip", default="", help=f"comma-separated: {', '.join(SKIPPABLE)}")
    p.add_argument("--profile", action="store_true",
                   help="perf-record the metrics-only daemon during round 1's throughput run")
    p.add_argument("--backends", default="",
                   help="space-separated hook backends (lsm fentry tracepoint): instead of the usual "
                        "configurations, one metrics-only daemon per backend beside the baseline")
    p.add_argument("--results-dir", default=os.path.join(REPO, "bench", "results"))
    a = p.parse_args(argv)
    a.skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    bad = a.skip - set(SKIPPABLE)
    if bad:
        p.error(f"--skip: unknown {', '.join(sorted(bad))}; choose from {', '.join(SKIPPABLE)}")
    from tapio_node.kernel.backends import ORDER
    a.backends = a.backends.replace(",", " ").split()
    if set(a.backends) - set(ORDER):
        p.error(f"--backends: unknown {', '.join(sorted(set(a.backends) - set(ORDER)))}; "
                f"choose from {', '.join(ORDER)}")
    if a.rounds is not None and a.rounds < 1:
        p.error("--rounds must be at least 1")
    return a


def reexec_in_private_mount_ns():
    """Every tmpfs and bind mount of the simulated node then dies with this
    process, even when it is killed."""
    if os.environ.get("TAPIO_BENCH_NS") == "1":
        return
    os.environ["TAPIO_BENCH_NS"] = "1"
    pp = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = REPO + (os.pathsep + pp if pp else "")
    os.execvp("unshare", ["unshare", "--mount", "--propagation", "private",
                          sys.executable, "-m", "bench", *sys.argv[1:]])


def build_workload(tmp):
    exe = os.path.join(tmp, "workload")
    src = os.path.join(REPO, "bench", "workload.c")
    subprocess.run(["gcc", "-O2", "-Wall", "-o", exe, src], check=True)
    return exe


def ensure_bpftrace():
    if shutil.which("bpftrace"):
        return None
    r = subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "bpftrace"],
                       capture_output=True, text=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if r.returncode != 0 or not shutil.which("bpftrace"):
        return f"bpftrace not installed and apt-get install failed: {r.stderr.strip()[-300:]}"
    return None


def audit_residue(env):
    """Does a freshly forked process carry an audit context (audit was
    enabled earlier without a never,task rule)? Then every baseline here
    pays audit's per-syscall cost too, until reboot."""
    if not shutil.which("bpftrace"):
        return None
    p = subprocess.Popen(
        ["bpftrace", "-e", 'tracepoint:syscalls:sys_enter_getpid /comm == "workload"/ '
         '{ printf("ctx=%llu\\n", (uint64)curtask->audit_context); exit(); }'],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        t0 = time.monotonic()
        while p.poll() is None and time.monotonic() - t0 < 30:
            subprocess.run([env.workload, "getpid", "1000"], stdout=subprocess.DEVNULL)
            time.sleep(0.2)
        out = p.communicate(timeout=5)[0] if p.poll() is not None else ""
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    for line in out.splitlines():
        if line.startswith("ctx="):
            return line != "ctx=0"
    return None


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


class Env:
    pass


def make_env(args, tmp):
    from tapio_node.sim.node import SimulatedNode, VolumeSpec

    env = Env()
    env.repo = REPO
    env.tmp = tmp
    env.sizes = dict(QUICK if args.quick else FULL)
    if args.rounds:
        env.sizes["rounds"] = args.rounds
    if args.pods:
        env.sizes["pods"] = args.pods
    env.workload = build_workload(tmp)
    env.unwatched = os.path.join(tmp, "unwatched.txt")
    with open(env.unwatched, "w") as f:
        f.write("not a secret\n")
    env.node = SimulatedNode(base_dir=os.path.join(tmp, "node"))
    env.settings_files = {"app.yaml": b"replicas: 3\n", "log.yaml": b"level: info\n"}
    env.pod = env.node.add_pod("bench", "app-0", [
        VolumeSpec("secret", "creds", {"password": b"hunter2\n", "token": b"t" * 64}),
        VolumeSpec("configmap", "settings", dict(env.settings_files)),
    ])
    env.update_n = 0
    env.container = env.pod.add_container("app")
    env.mounts = env.container.default_mounts()
    # in-container paths: key symlink -> ..data/key -> ..<ts>/key, bind-mounted
    env.watched = "/run/secrets/creds/password"
    env.race_path = "/run/config/settings/app.yaml"
    env.naive_prefixes = [env.node.pods_path + "/", "/run/secrets/"]
    env.audit_watch_dirs = [env.pod.volume_dir("creds")]
    env.audit = None
    return env


def main_configs(skip, backends=()):
    if backends:
        return [C.Baseline()] + [C.Tapio(f"tapio-{b}", "none", config={"hook_backend": b},
                                         note=f"--output none, hook_backend: {b}") for b in backends]
    cfgs = [C.Baseline(),
            C.Tapio("tapio-stdout", "stdout", note="real daemon, --output stdout > /dev/null"),
            C.Tapio("tapio-metrics", "none", note="real daemon, --output none (metrics only)")]
    if "sampling" not in skip:
        cfgs.append(C.Tapio("tapio-sampling", "none", sampling=100,
                            note="--output none, syscall_sampling_rate: 100"))
    if "bpftrace" not in skip:
        cfgs += [C.Bpftrace("bpftrace-count", False), C.Bpftrace("bpftrace-print", True)]
    return cfgs


def run_rounds(env, cfgs, rounds, raw, counts, tput, do_tput, scale_of, log, profile=None):
    for r in range(rounds):
        order = cfgs[r % len(cfgs):] + cfgs[:r % len(cfgs)]
        log(f"round {r + 1}/{rounds}: {', '.join(c.name for c in order)}")
        for cfg in order:
            cfg.start(env)
            try:
                for wl in scenarios.MICRO:
                    args, expected = scenarios.micro_args(env, wl, scale_of(cfg))
                    m = scenarios.measure(env, cfg, wl, args, expected)
                    raw.setdefault(cfg.name, {}).setdefault(wl, {})[r] = m["workload"]["ns_per_op"]
                    counts.setdefault(cfg.name, {}).setdefault(wl, {})[r] = m
                if do_tput:
                    profs = None
                    if profile is not None and r == 0 and cfg.name == "tapio-metrics":
                        profs = {"perf": scenarios.Perf(cfg.pid, os.path.join(env.tmp, "perf.data")),
                                 "py-spy": scenarios.PySpy(cfg.pid, os.path.join(env.tmp, "spy.txt"))}
                    try:
                        t = scenarios.throughput(env, cfg, scale_of(cfg))
                    finally:
                        for kind, prof in (profs or {}).items():
                            profile[f"tapio-metrics throughput, {kind}"] = prof.stop()
                    tput.setdefault(cfg.name, {})[r] = t
            finally:
                if isinstance(cfg, C.Bpftrace):
                    seen = cfg.stop_and_count()
                    counts.setdefault(cfg.name, {}).setdefault("tracer_total", {})[r] = seen
                else:
                    cfg.stop()
            cells = "  ".join(f"{wl} {raw[cfg.name][wl][r]:,.0f}" for wl in scenarios.MICRO)
            extra = ""
            if do_tput:
                extra = f"  hammer {tput[cfg.name][r]['opens_per_s']:,.0f} opens/s"
                if "events" in tput[cfg.name][r]:
                    t = tput[cfg.name][r]
                    extra += f" events {t['events']:,.0f}/{t['opens']:,} rb-overflow {t['drops']:,.0f}"
            log(f"  {cfg.name:15s} {cells} ns/op{extra}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if os.geteuid() != 0:
        print("python -m bench needs root (BPF, tmpfs mounts, cgroups, auditd)", file=sys.stderr)
        return 2
    reexec_in_private_mount_ns()
    # SIGTERM (a timeout, a CI cancel) unwinds through the finally blocks
    # that stop auditd, bpftrace and the daemons
    signal.signal(signal.SIGTERM, _interrupt)
    t_begin = time.monotonic()
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    log = lambda msg: print(f"[{time.monotonic() - t_begin:6.1f}s] {msg}", flush=True)
    tmp = tempfile.mkdtemp(prefix="tapio-bench-")
    notes, errors = [], []
    skip = set(args.skip)
    why = ensure_bpftrace() if "bpftrace" not in skip else None
    if why:
        notes.append(f"bpftrace configurations skipped: {why}")
        skip.add("bpftrace")
    if "auditd" not in skip:
        why = C.AuditSession.available()
        if why:
            notes.append(f"auditd configurations skipped: {why}")
            skip.add("auditd")
    env = None
    interrupted = False
    raw, counts, tput, extra, costs = {}, {}, {}, {}, {}
    cfgs = main_configs(skip, args.backends)
    audit_cfgs = []
    try:
        env = make_env(args, tmp)
        sz = env.sizes
        log(f"mode {'quick' if args.quick else 'full'}: {sz['rounds']} rounds; tmp {tmp}")
        residue = audit_residue(env)
        extra["audit_residue_before"] = residue
        if residue:
            notes.append("audit was enabled on this machine before the run without a never,task "
                         "rule: every process here pays audit's per-syscall cost (all "
                         "configurations, baseline included) until reboot")
        do_tput = "throughput" not in skip
        profile = {} if args.profile else None
        run_rounds(env, cfgs, sz["rounds"], raw, counts, tput, do_tput, lambda c: 1.0, log,
                   profile)
        if profile:
            extra["profile"] = profile
        if "bpfcost" not in skip:
            for cfg in cfgs:
                if isinstance(cfg, C.Tapio):
                    log(f"bpf cost, {cfg.name} ...")
                    try:
                        costs[cfg.name] = bpfcost.measure(env, cfg)
                    except Exception as e:
                        errors.append(f"bpf cost {cfg.name}: {e}")
                        log(f"  bpf cost FAILED: {e}")
        for name, fn in (("latency", lambda: scenarios.latency(env)),
                         ("update_race", lambda: scenarios.update_race(env)),
                         ("startup", lambda: scenarios.startup(env, sz["pods"])),
                         ("storm", lambda: scenarios.storm(env)),
                         ("overflow", lambda: scenarios.overflow(env)),
                         ("mounts", lambda: scenarios.mount_change(env, sz["mounts"]))):
            if name.split("_")[-1] in skip:
                continue
            log(f"{name} ...")
            try:
                extra[name] = fn()
                log(f"  {name}: " + json.dumps({k: v for k, v in extra[name].items()
                                                if k != "what"}, default=str))
            except Exception as e:
                errors.append(f"{name}: {e}")
                log(f"  {name} FAILED: {e}")
                traceback.print_exc()
        if "auditd" not in skip:
            log("auditd configurations, last: once audit is enabled, processes forked without "
                "a never,task rule pay its per-syscall cost until they exit")
            env.audit = C.AuditSession(env)
            audit_cfgs = [C.AuditBaseline(), C.Auditd("auditd-norules", False),
                          C.Auditd("auditd-watch", True)]
            try:
                env.audit.start()
                scale = lambda c: AUDIT_SCALE if isinstance(c, C.Auditd) and c.watch else 1.0
                run_rounds(env, audit_cfgs, sz["rounds"], raw, counts, tput, do_tput, scale, log)
                audit_log = os.path.join(tmp, "audit", "audit.log")
                if os.path.exists(audit_log):
                    with open(audit_log, errors="replace") as f:
                        extra["auditd_watch_records"] = sum('key="tapio-bench"' in ln for ln in f)
            finally:
                errs = env.audit.stop()
                errors += [f"auditd cleanup: {e}" for e in errs]
            notes.append("auditd configurations ran last; a never,task audit rule was left loaded "
                         "so that new processes do not pay audit's per-syscall cost "
                         "(`auditctl -D` removes it; new processes then pay until reboot)")
    except KeyboardInterrupt:
        interrupted = True
        errors.append("interrupted")
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}")
        traceback.print_exc()
    finally:
        if env is not None:
            try:
                env.node.close()
            except Exception as e:
                errors.append(f"node cleanup: {e}")
        shutil.rmtree(tmp, ignore_errors=True)

    all_cfgs = cfgs + audit_cfgs
    summary = report.summarize_micro(raw, all_cfgs)
    if costs:
        extra["bpf_cost"] = bpfcost.breakdown(costs, summary)
    tsum = report.throughput_summary(tput)
    exact = report.exact_counts(counts)
    tgt = report.explain(report.targets(summary, tsum, exact, extra), extra.get("profile"))
    result = {
        "timestamp": stamp, "mode": "quick" if args.quick else "full",
        "host": {"kernel": platform.release(), "cpus": os.cpu_count(),
                 "python": platform.python_version()},
        "sizes": env.sizes if env else None, "wall_s": time.monotonic() - t_begin,
        "configs": [c.describe() for c in all_cfgs],
        "micro": summary, "throughput": tsum, "event_counts": exact,
        "throughput_rounds": tput, "tracer_counts": {k: v.get("tracer_total") for k, v in
                                                     counts.items() if "tracer_total" in v},
        **extra, "targets": tgt, "notes": notes, "errors": errors,
    }
    path = report.write(result, args.results_dir, stamp, report.markdown(result, all_cfgs),
                        latest=not interrupted)
    print()
    print(report.table(summary, all_cfgs, scenarios.MICRO))
    print("\nratios: median over rounds of (config / baseline of the same round); "
          "[min-max] of those ratios")
    print(report.fmt_other(result))
    print("\ntargets:")
    print(report.fmt_targets(tgt))
    for n in notes:
        print(f"note: {n}")
    for e in errors:
        print(f"error: {e}")
    print(f"\nresults: {os.path.relpath(path, os.getcwd())}"
          f"{'' if interrupted else ' (and latest.json, latest.md)'}; "
          f"{time.monotonic() - t_begin:.0f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
