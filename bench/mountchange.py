"""python -m bench.mountchange [--mounts N] — the daemon's handling of a
mount change on a node with N tmpfs volume mounts (default 3,000).

Re-executes itself in a private mount namespace (unshare), so its mounts
die with it. Lays the mounts out as the kubelet does (a secret and the
service-account projected volume per pod, tmpfs each, atomic-writer
layout inside; a configmap dir on the node's disk), indexes them with a
VolumeIndex, then mounts and unmounts one volume at a time and times,
after each change:
  refresh         VolumeIndex.mounts_changed(), what the daemon runs on
                  EPOLLPRI from mountinfo (an lstat per volume)
  read            reading /proc/self/mountinfo, no parsing (kernel time)
  parse old       read + the line.partition(" - ") loop the call sites had
                  (mount point and fstype only, no unescaping)
  parse python    read + host._py_parse_mountinfo, every field
  parse fast      read + _fast.parse_mountinfo, every field
  only python, only fast   the two parsers on text already read
Prints one JSON line (medians and p90 in ms); bench runs it as the
`mounts` scenario.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.report import fmt_mounts  # noqa: E402
from tapio_node import host  # noqa: E402

_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2
PLUGINS = {"kubernetes.io~secret": "secret", "kubernetes.io~projected": "projected",
           "kubernetes.io~configmap": "configmap"}


def _mount_tmpfs(path: str) -> None:
    if _libc.mount(b"tmpfs", os.fsencode(path), b"tmpfs", 0, b"size=64k,mode=0755") != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount tmpfs on {path}: {os.strerror(err)}")


def _umount(path: str) -> None:
    if _libc.umount2(os.fsencode(path), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {path}: {os.strerror(err)}")


def _fill(vol: str, keys: dict[str, bytes]) -> None:
    """The kubelet's atomic-writer layout: key -> ..data/key -> ..<ts>/key."""
    ts = os.path.join(vol, "..2024_01_01_00_00_00.000000001")
    os.mkdir(ts)
    for k, v in keys.items():
        with open(os.path.join(ts, k), "wb") as f:
            f.write(v)
    os.symlink(os.path.basename(ts), os.path.join(vol, "..data"))
    for k in keys:
        os.symlink(os.path.join("..data", k), os.path.join(vol, k))


def build(root: str, n_mounts: int) -> list[str]:
    """n_mounts tmpfs volumes (two per pod) under root/pods; their paths."""
    pods = os.path.join(root, "pods")
    mounted = []
    for i in range((n_mounts + 1) // 2):
        vols = os.path.join(pods, str(uuid.UUID(int=i + 1)), "volumes")
        for plugin, name, keys in (
                ("kubernetes.io~secret", "db-creds", {"password": b"p%d\n" % i}),
                ("kubernetes.io~projected", "kube-api-access-x2k9p",
                 {"token": b"t" * 64, "ca.crt": b"c\n", "namespace": b"load\n"}),
                ("kubernetes.io~configmap", "app-config", {"app.yaml": b"replicas: 3\n"})):
            vol = os.path.join(vols, plugin, name)
            os.makedirs(vol)
            if plugin != "kubernetes.io~configmap" and len(mounted) < n_mounts:
                _mount_tmpfs(vol)
                mounted.append(vol)
            _fill(vol, keys)
    return mounted


def _old_parse(data: bytes) -> list[tuple[str, str]]:
    out = []
    for line in data.decode("utf-8", "replace").splitlines():
        left, _, right = line.partition(" - ")
        out.append((left.split(" ")[4], right.split(" ", 1)[0]))
    return out


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _stats(ms: list[float]) -> dict:
    s = sorted(ms)
    return {"median_ms": s[len(s) // 2], "p90_ms": s[min(len(s) - 1, int(len(s) * 0.9))],
            "min_ms": s[0]}


def run(n_mounts: int, changes: int) -> dict:
    root = tempfile.mkdtemp(prefix="tapio-mounts-")
    try:
        return _run(root, n_mounts, changes)
    finally:
        for mp in reversed(host.mounts_under(root)):
            _umount(mp)
        shutil.rmtree(root)


def _run(root: str, n_mounts: int, changes: int) -> dict:
    from tapio_node import _fast
    from tapio_node.volumes import VolumeIndex

    t0 = time.monotonic()
    mounted = build(root, n_mounts)
    build_s = time.monotonic() - t0
    idx = VolumeIndex(os.path.join(root, "pods"), PLUGINS)
    idx.scan_all()
    lines = host.read_proc(host.MOUNTINFO).count(b"\n")
    read = lambda: host.read_proc(host.MOUNTINFO)  # noqa: E731
    text = b""  # the table as read after each change
    cases = {
        "refresh": idx.mounts_changed,
        "read": read,
        "parse_old": lambda: _old_parse(read()),
        "parse_python": lambda: host._py_parse_mountinfo(read()),
        "parse_fast": lambda: _fast.parse_mountinfo(read()),
        "only_python": lambda: host._py_parse_mountinfo(text),
        "only_fast": lambda: _fast.parse_mountinfo(text),
    }
    times: dict[str, list[float]] = {k: [] for k in cases}
    rescanned = 0
    for i in range(changes):
        vol = mounted[(i // 2 * 97) % len(mounted)]
        if i % 2 == 0:
            _umount(vol)            # a pod's volume goes away
        else:
            _mount_tmpfs(vol)       # and comes back, empty
        before = {v.id: v.dev for v in idx.volumes.values()}
        times["refresh"].append(_time(cases["refresh"]))
        rescanned += sum(1 for v in idx.volumes.values() if before.get(v.id) != v.dev)
        text = read()
        for name in ("read", "parse_old", "parse_python", "parse_fast", "only_python", "only_fast"):
            times[name].append(_time(cases[name]))
    same = _fast.parse_mountinfo(read()) == host._py_parse_mountinfo(read())
    idx.close()
    return {"tmpfs_mounts": len(mounted), "mountinfo_lines": lines, "volumes": len(idx.volumes),
            "changes": changes, "volumes_rescanned": rescanned, "build_s": build_s,
            "parsers_agree": same, **{k: _stats(v) for k, v in times.items()},
            "what": "ms after one tmpfs volume mount or unmount; refresh = "
                    "VolumeIndex.mounts_changed (the daemon's handler); read/parse_* = "
                    "what re-reading /proc/self/mountinfo would cost with each parser"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.mountchange", description=__doc__.split("\n\n")[0])
    p.add_argument("--mounts", type=int, default=3000)
    p.add_argument("--changes", type=int, default=40, help="mount changes timed")
    a = p.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench.mountchange needs root (tmpfs mounts)", file=sys.stderr)
        return 2
    if os.environ.get("TAPIO_MOUNTCHANGE_NS") != "1":
        os.environ["TAPIO_MOUNTCHANGE_NS"] = "1"
        pp = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = REPO + (os.pathsep + pp if pp else "")
        os.execvp("unshare", ["unshare", "--mount", "--propagation", "private",
                              sys.executable, "-m", "bench.mountchange", *sys.argv[1:]])
    r = run(a.mounts, a.changes)
    print(fmt_mounts(r), file=sys.stderr)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
