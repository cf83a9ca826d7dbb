"""What the daemon's BPF programs themselves cost per syscall, from the
kernel's own accounting (BPF_ENABLE_STATS: run_cnt and run_time_ns of each
program), set beside the whole cost the rounds measured. The difference is
the hook's machinery, which no change to our programs can shave: the
syscall slow path for tracepoints, the trampoline for fentry and BPF LSM.

Run after the rounds, one daemon at a time, because the accounting itself
adds two clock reads to every program run."""
from __future__ import annotations

import json
import os
import struct
import subprocess

from bench import scenarios
from tapio_node.kernel import sysbpf

BPF_ENABLE_STATS, BPF_STATS_RUN_TIME = 32, 0


class StatsOn:
    """Kernel BPF run-time accounting, on while this holds its fd."""

    def __enter__(self):
        fd = sysbpf.bpf(BPF_ENABLE_STATS, struct.pack("<I", BPF_STATS_RUN_TIME).ljust(8, b"\0"))
        if fd < 0:
            raise OSError(-fd, f"BPF_ENABLE_STATS: {sysbpf.errno_text(-fd)}")
        self.fd = fd
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def prog_ids(pid: int) -> set[int]:
    """The ids of the BPF programs a process holds an fd of."""
    ids = set()
    base = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(base):
        try:
            with open(os.path.join(base, fd)) as f:
                for line in f:
                    if line.startswith("prog_id:"):
                        ids.add(int(line.split()[1]))
        except OSError:
            continue
    return ids


def snapshot(pid: int) -> dict[str, tuple[int, int]]:
    """{program name: (run_cnt, run_time_ns)} of the process's programs."""
    ids = prog_ids(pid)
    out = subprocess.run(["bpftool", "--json", "prog", "show"], capture_output=True, text=True,
                         check=True).stdout
    snap = {}
    for p in json.loads(out):
        if p.get("id") in ids:
            snap[p.get("name") or str(p["id"])] = (p.get("run_cnt", 0), p.get("run_time_ns", 0))
    return snap


def measure(env, cfg) -> dict:
    """Per micro workload: the programs that ran, runs and ns per operation."""
    out = {}
    cfg.start(env)
    try:
        with StatsOn():
            for wl in scenarios.MICRO:
                args, _ = scenarios.micro_args(env, wl)
                before = snapshot(cfg.pid)
                res = scenarios.run_workload(env, args)
                after = snapshot(cfg.pid)
                n = res["n"]
                progs = {}
                for name, (cnt, ns) in after.items():
                    c0, t0 = before.get(name, (0, 0))
                    # not the workload's exec and exit
                    if cnt - c0 >= n / 100:
                        progs[name] = {"runs_per_op": (cnt - c0) / n,
                                       "ns_per_run": (ns - t0) / (cnt - c0),
                                       "ns_per_op": (ns - t0) / n}
                out[wl] = {"ns_per_op_with_stats": res["ns_per_op"], "programs": progs,
                           "bpf_ns_per_op": sum(p["ns_per_op"] for p in progs.values())}
    finally:
        cfg.stop()
    return out


def breakdown(costs: dict, summary: dict) -> dict:
    """Per config and workload: what tracing added per op in the rounds
    (median config - baseline), what of it our programs spent, the rest."""
    out = {}
    base = summary.get("baseline", {})
    for name, per_wl in costs.items():
        for wl, c in per_wl.items():
            s, b = summary.get(name, {}).get(wl), base.get(wl)
            if not s or not b:
                continue
            added = s["median"] - b["median"]
            out.setdefault(name, {})[wl] = {
                "added_ns_per_op": added, "bpf_ns_per_op": c["bpf_ns_per_op"],
                "machinery_ns_per_op": added - c["bpf_ns_per_op"],
                "programs": c["programs"]}
    return out


def fmt(bd: dict) -> str:
    lines = ["BPF programs' own cost (kernel run-time accounting, a separate pass) and the rest "
             "of what tracing added (rounds' median - baseline):"]
    for name, per_wl in bd.items():
        for wl, d in per_wl.items():
            progs = ", ".join(f"{p} {v['runs_per_op']:.2f} runs x {v['ns_per_run']:,.0f} ns"
                              for p, v in sorted(d["programs"].items())) or "no program ran"
            lines.append(f"  {name:15s} {wl:9s} added {d['added_ns_per_op']:8,.0f} ns/op = "
                         f"programs {d['bpf_ns_per_op']:7,.0f} + machinery "
                         f"{d['machinery_ns_per_op']:8,.0f}  ({progs})")
    return "\n".join(lines)
