"""What is measured: the per-syscall workloads and throughput (run under
every configuration, every round), and the tapio-node-only figures:
latency, start-up with many pods, and the atomic-writer update race."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

from bench import procs
from bench.configs import Tapio
from bench.mapprobe import WatchedInodes
from bench.stats import hist_quantile, quantile

MICRO = ("open_unw", "read_wat", "getpid")


def run_workload(env, args, timeout=600):
    """Run the workload in the pod's container; its JSON result line."""
    p = env.container.run([env.workload, *args], mounts=env.mounts,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise RuntimeError(f"workload {' '.join(args)} did not finish in {timeout} s")
    if p.returncode != 0:
        raise RuntimeError(f"workload {' '.join(args)} failed ({p.returncode}): "
                           f"{err.decode(errors='replace').strip()}")
    return json.loads(out.decode().strip().splitlines()[-1])


def micro_args(env, workload, scale=1.0):
    n = max(1000, int(env.sizes[workload] * scale))
    if workload == "open_unw":
        return ["open_unw", env.unwatched, str(n)], 0
    if workload == "read_wat":
        # the workload warms up with n/10 + 1 opens first: all are events
        return ["read_wat", env.watched, str(n)], n + n // 10 + 1
    return ["getpid", str(n)], 0


def settle(cfg, base, expected, timeout=120.0, quiet_polls=4, give_up_polls=80):
    """The counters once the daemon has caught up: `expected` more events
    and then no change for `quiet_polls` polls (so late and extra events
    count against this workload, not the next), or no change for
    `give_up_polls` polls (4 s: the daemon folds the kernel's ring-buffer
    overflow counts back in within 2 s, over eight map generations). The
    timeout only ends a count that is still moving: a daemon in a TCG VM
    drains a backlog for tens of seconds.
    Events arrive after the syscalls return: counting too early would
    report false misses."""
    t0 = time.monotonic()
    last, still = None, 0
    while True:
        c = cfg.counters()
        got = c["events"] - base["events"]
        still = still + 1 if got == last else 0
        if got >= expected and still >= quiet_polls:
            return c
        if still >= give_up_polls or time.monotonic() - t0 > timeout:
            return c
        last = got
        time.sleep(0.05)


def measure(env, cfg, workload, args, expected):
    """One workload under one configuration: the workload's own figures plus
    what the tracer saw and spent."""
    base = cfg.counters() if isinstance(cfg, Tapio) else None
    cpu0 = procs.cpu_seconds(cfg.pid) if cfg.pid else None
    res = run_workload(env, args)
    out = {"workload": res}
    if base is not None:
        c = settle(cfg, base, expected)
        out["expected_events"] = expected
        out["events"] = c["events"] - base["events"]
        out["drops"] = c["drops"] - base["drops"]
    if cpu0 is not None:
        out["tracer_cpu_s"] = procs.cpu_seconds(cfg.pid) - cpu0
        out["tracer_rss_bytes"] = procs.rss_bytes(cfg.pid)
    return out


def throughput(env, cfg, scale=1.0):
    n = max(1000, int(env.sizes["hammer"] * scale))
    r = measure(env, cfg, "hammer", ["hammer", env.watched, str(n), "2"], n)
    w = r["workload"]
    r["opens"] = w["n"]
    r["opens_per_s"] = w["ops_per_s"]
    if "events" in r:
        r["events_per_s"] = r["events"] * 1e9 / w["elapsed_ns"]
    if "tracer_cpu_s" in r and r.get("events"):
        r["tracer_cpu_us_per_event"] = r["tracer_cpu_s"] * 1e6 / r["events"]
    return r


class Perf:
    """perf record -g on one process; stop() gives the top of the report."""

    def __init__(self, pid, out):
        import shutil
        self.out = out
        self.proc = None
        if shutil.which("perf"):
            self.proc = subprocess.Popen(["perf", "record", "-F", "999", "-g", "-p", str(pid),
                                          "-o", out], stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
            time.sleep(0.5)

    def stop(self):
        if self.proc is None:
            return "perf not installed"
        procs.stop(self.proc, sig=signal.SIGINT)
        r = subprocess.run(["perf", "report", "-i", self.out, "--stdio", "--no-children",
                            "--sort", "dso,symbol", "--percent-limit", "1", "-g", "none"],
                           capture_output=True, text=True)
        lines = [ln for ln in r.stdout.splitlines() if ln.strip() and not ln.startswith("#")]
        return "\n".join(lines[:40])


class PySpy:
    """py-spy record (non-blocking) of the daemon's Python stacks; stop()
    gives the functions with the most samples on top of the stack."""

    def __init__(self, pid, out):
        import shutil
        exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        self.out = out
        self.proc = None
        if os.access(exe, os.X_OK):
            self.proc = subprocess.Popen([exe, "record", "--nonblocking", "--gil", "--rate", "250",
                                          "-f", "raw", "-o", out, "-p", str(pid)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         preexec_fn=procs.die_with_parent)
            time.sleep(0.5)

    def stop(self):
        if self.proc is None:
            return "py-spy not installed (pip install py-spy)"
        procs.stop(self.proc, sig=signal.SIGINT)
        self_n, total = {}, 0
        try:
            with open(self.out) as f:
                for line in f:
                    stack, _, n = line.rstrip().rpartition(" ")
                    if not stack or not n.isdigit():
                        continue
                    leaf = stack.split(";")[-1]
                    self_n[leaf] = self_n.get(leaf, 0) + int(n)
                    total += int(n)
        except OSError as e:
            return f"py-spy wrote nothing: {e}"
        top = sorted(self_n.items(), key=lambda kv: -kv[1])[:20]
        return "\n".join(f"{100 * n / total:6.2f}%  {leaf}" for leaf, n in top)


# -- latency ---------------------------------------------------------------

class LineClock:
    """Reads the daemon's stdout, stamping each line with CLOCK_MONOTONIC
    (the workload's and the kernel's clock) as it arrives."""

    def __init__(self):
        self.lines = []
        self.lock = threading.Lock()

    def __call__(self, pipe):
        for line in iter(pipe.readline, b""):
            t = time.monotonic_ns()
            with self.lock:
                self.lines.append((t, line))

    def events_of(self, pid):
        out = []
        with self.lock:
            lines = list(self.lines)
        for t, line in lines:
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if (ev.get("process") or {}).get("pid") == pid:
                out.append((t, ev))
        return out


def latency(env):
    """open() in the pod → JSON line read from the daemon's stdout, at ~1k/s."""
    clock = LineClock()
    cfg = Tapio("tapio-latency", "stdout", stdout=clock, note="stdout to a pipe")
    rate, secs = env.sizes["latency_rate"], env.sizes["latency_secs"]
    tsfile = os.path.join(env.tmp, "paced.ts")
    cfg.start(env)
    try:
        base = cfg.counters()
        cpu0 = procs.cpu_seconds(cfg.pid)
        res = run_workload(env, ["paced", env.watched, str(rate), str(secs), tsfile])
        n = res["n"]
        end = time.monotonic() + 10
        while len(clock.events_of(res["pid"])) < n and time.monotonic() < end:
            time.sleep(0.05)
        cpu = procs.cpu_seconds(cfg.pid) - cpu0
        after = cfg.counters()
    finally:
        cfg.stop()
    with open(tsfile) as f:
        sent = [int(x) for x in f.read().split()]
    got = clock.events_of(res["pid"])
    lat = [(t - s) / 1e3 for (t, _ev), s in zip(got, sent)]
    out = {
        "rate_per_s": rate, "opens": n, "events": len(got),
        "missing": n - len(got),
        "end_to_end_us": {"p50": quantile(lat, 0.5), "p99": quantile(lat, 0.99),
                          "max": max(lat) if lat else None},
        "daemon_cpu_s": cpu,
        "daemon_cpu_pct": 100.0 * cpu / secs,
        "what": "open() start in the workload -> the JSON line read from the daemon's stdout pipe "
                "(CLOCK_MONOTONIC both ends)",
    }
    b = [(le, c - dict(base["latency_buckets"]).get(le, 0)) for le, c in after["latency_buckets"]]
    if b:
        out["daemon_histogram_us"] = {
            q: (v * 1e6 if v is not None else None)
            for q, v in (("p50", hist_quantile(b, 0.5)), ("p99", hist_quantile(b, 0.99)))}
    return out


# -- update race -----------------------------------------------------------

def update_race(env):
    """A reader loops on a ConfigMap key while the kubelet's atomic writer
    replaces the volume; count opens without an event and time how long the
    new inode takes to appear in the kernel map."""
    clock = LineClock()
    cfg = Tapio("tapio-race", "stdout", stdout=clock, note="stdout to a pipe")
    secs = env.sizes["race_secs"]
    out_file = os.path.join(env.tmp, "race.txt")
    cfg.start(env)
    probe = None
    try:
        probe = WatchedInodes(cfg.pid)
        reader = env.container.run([env.workload, "race", env.race_path, str(secs), out_file],
                                   mounts=env.mounts, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE)
        time.sleep(min(1.0, secs / 3))
        vol = env.pod.volume_dir("settings")
        t_start = time.monotonic_ns()
        env.update_n += 1
        # in-process (as_kubelet=False): the write's own time, not a python start-up
        env.pod.update_volume("settings", {k: v + b"# update %d\n" % env.update_n
                                           for k, v in env.settings_files.items()},
                              as_kubelet=False)
        t_done = time.monotonic_ns()
        new_file = os.path.realpath(os.path.join(vol, "app.yaml"))
        new_ino = os.stat(new_file).st_ino
        # poll the map: how long after the update returned is the new file watched?
        map_ms = None
        while time.monotonic_ns() - t_done < 5e9:
            if probe.has(new_file):
                map_ms = (time.monotonic_ns() - t_done) / 1e6
                break
            time.sleep(0.0002)
        rout, rerr = reader.communicate(timeout=secs + 60)
        if reader.returncode != 0:
            raise RuntimeError(f"race reader failed: {rerr.decode(errors='replace')}")
        res = json.loads(rout.decode().strip().splitlines()[-1])
        end = time.monotonic() + 10
        while len(clock.events_of(res["pid"])) < res["n"] and time.monotonic() < end:
            time.sleep(0.05)
    finally:
        if probe:
            probe.close()
        cfg.stop()
    with open(out_file) as f:
        recs = [tuple(map(int, line.split())) for line in f]
    got = clock.events_of(res["pid"])
    new_opens = [t for t, ino in recs if ino == new_ino]
    return {
        "opens": len(recs), "events": len(got), "missed_opens": len(recs) - len(got),
        "failed_opens": res["failed_opens"],
        "opens_of_new_inode": len(new_opens),
        "first_new_open_after_update_ms": ((new_opens[0] - t_start) / 1e6) if new_opens else None,
        "update_s": (t_done - t_start) / 1e9,
        "map_current_after_update_ms": map_ms,
        "what": "map_current: from the kubelet's atomic write returning to the new inode "
                "found in watched_inodes (polled every ~0.2 ms)",
    }


# -- start-up --------------------------------------------------------------

def startup(env, n_pods):
    """Ready time and RSS with n_pods × 5 volumes × 3 keys on disk."""
    from tapio_node.sim.node import SimulatedNode, VolumeSpec

    t0 = time.monotonic()
    big = SimulatedNode(base_dir=os.path.join(env.tmp, "startup-node"))
    try:
        for i in range(n_pods):
            keys = lambda p: {f"{p}-{k}": b"v%d\n" % i for k in range(3)}
            big.add_pod("load", f"pod-{i}", [
                VolumeSpec("configmap", "app-config", keys("conf")),
                VolumeSpec("configmap", "feature-flags", keys("flag")),
                VolumeSpec("secret", "db-creds", keys("db")),
                VolumeSpec("secret", "tls", keys("tls")),
            ])  # + the service-account projected volume: 5 volumes
        build_s = time.monotonic() - t0
        cfg = Tapio("tapio-startup", "none", note="metrics only")
        saved = env.node
        env.node = big
        try:
            cfg.start(env, ready_timeout=300)
            ready_s = cfg.ready_s
            t_end = time.monotonic() + 5
            while cfg.ready_notify_s is None and time.monotonic() < t_end:
                time.sleep(0.01)
            ready_notify_s = cfg.ready_notify_s
            rss_ready = procs.rss_bytes(cfg.pid)
            time.sleep(2.0)
            rss_2s = procs.rss_bytes(cfg.pid)
            cpu = procs.cpu_seconds(cfg.pid)
        finally:
            env.node = saved
            cfg.stop()
    finally:
        big.close()
    return {"pods": n_pods, "volumes": n_pods * 5, "keys": n_pods * 15,
            "tmpfs_mounts": n_pods * 3, "build_node_s": build_s,
            "ready_s": ready_s, "ready_notify_s": ready_notify_s, "rss_ready_bytes": rss_ready, "rss_after_2s_bytes": rss_2s,
            "daemon_cpu_s_at_ready_plus_2s": cpu,
            "what": "process start -> GET /healthz 200 (polled every 5 ms); ready_notify_s: "
                    "-> READY=1 on NOTIFY_SOCKET"}


def mount_change(env, n_mounts=3000):
    """The daemon's handling of one mount change with n_mounts tmpfs
    volumes, and what re-reading mountinfo costs with each parser
    (bench/mountchange.py, in its own mount namespace)."""
    r = subprocess.run([sys.executable, "-m", "bench.mountchange", "--mounts", str(n_mounts)],
                       cwd=env.repo, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "TAPIO_MOUNTCHANGE_NS": ""})
    if r.returncode != 0:
        raise RuntimeError(f"bench.mountchange failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# -- hostile tenants ---------------------------------------------------------

def _hammer(env, cfg, secs, vary_path, stop_daemon_s=0.0):
    """Two container readers open the watched key in a loop for `secs`
    (through ever-different path spellings when vary_path: no folding),
    optionally with the daemon stopped for a while (the ring overflows).
    The daemon's max RSS and CPU, and every access accounted for."""
    base = cfg.counters()
    cpu0 = procs.cpu_seconds(cfg.pid)
    readers = [env.container.start_reader(env.watched, count=0, vary_path=vary_path, mounts=env.mounts)
               for _ in range(2)]
    max_rss, t0 = 0, time.monotonic()
    try:
        for r in readers:
            r.go()
        if stop_daemon_s:
            os.kill(cfg.pid, signal.SIGSTOP)
            time.sleep(stop_daemon_s)
            os.kill(cfg.pid, signal.SIGCONT)
        while time.monotonic() - t0 < secs:
            max_rss = max(max_rss, procs.rss_bytes(cfg.pid))
            time.sleep(0.1)
    finally:
        summaries = [r.stop() for r in readers]
    opened = sum(x["opened"] for x in summaries)
    after = settle(cfg, base, opened, timeout=120, give_up_polls=100)
    max_rss = max(max_rss, procs.rss_bytes(cfg.pid))
    events = after["events"] - base["events"]
    return {"opens": opened, "events": events, "lost_events": opened - events,
            "lost_by_reason": {k: v - base["lost"].get(k, 0) for k, v in after["lost"].items()},
            "ring_buffer_drops": after["drops"] - base["drops"],
            "daemon_max_rss_bytes": max_rss, "daemon_cpu_s": procs.cpu_seconds(cfg.pid) - cpu0,
            "seconds": secs}


def storm(env):
    """A pod defeats folding: opens through ever-different path strings."""
    cfg = Tapio("tapio-storm", "stdout", note="stdout to /dev/null")
    cfg.start(env)
    try:
        out = _hammer(env, cfg, env.sizes["storm_secs"], vary_path=True)
    finally:
        cfg.stop()
    out["what"] = ("2 readers in a pod, each open a distinct spelling of the key's path, "
                   "stdout output; every open must be counted")
    return out


def overflow(env):
    """The ring buffer overflows (daemon stopped, small ring): the kernel's
    overflow counts carry the accesses; RSS must stay bounded."""
    cfg = Tapio("tapio-overflow", "stdout", note="stdout to /dev/null, 64 KiB ring",
                config={"ring_buffer_size": 65536})
    cfg.start(env)
    try:
        out = _hammer(env, cfg, env.sizes["storm_secs"], vary_path=False, stop_daemon_s=3.0)
    finally:
        cfg.stop()
    out["what"] = ("2 readers in a pod hammer one key while the daemon is stopped for 3 s "
                   "with a 64 KiB ring; every open must be counted")
    return out
