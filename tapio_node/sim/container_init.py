"""A simulated container's init: join its cgroup, build its mounts, exec.

    python -I -S container_init.py SPEC_JSON ARGV...

Run inside a fresh private mount namespace (``unshare --mount``) with
``-I -S``, so that only the stdlib is touched before the exec. SPEC is
``{"cgroup_procs": path, "mounts": [[in-container path, host dir or file], ...],
"cwd": dir or null}``. Each mount is bound read-only at its in-container path,
as the kubelet mounts ConfigMap, Secret and projected volumes; mount points
are made on tmpfs copies of their parent dirs, never on the host.
"""

import ctypes
import json
import os
import sys

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18

libc = ctypes.CDLL(None, use_errno=True)
ours = set()  # st_dev of the tmpfs mounts made here: mount points may be created in them
stage_n = 0


def mount(src, tgt, fstype, flags, data=None):
    e = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    if libc.mount(e(src), e(tgt), e(fstype), ctypes.c_ulong(flags), e(data)) != 0:
        err = ctypes.get_errno()
        sys.stderr.write("container init: mount %s on %s: %s\n" % (src or fstype, tgt, os.strerror(err)))
        os._exit(127)


def tmpfs(d, mode):
    mount("tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "mode=%o" % mode)
    ours.add(os.stat(d).st_dev)


def populate(src, dst, skip=()):
    # Re-expose src's entries in the (tmpfs) dir dst: symlinks copied, the rest bind-mounted.
    for ent in os.scandir(src):
        if ent.name in skip:
            continue
        d = os.path.join(dst, ent.name)
        if ent.is_symlink():
            os.symlink(os.readlink(ent.path), d)
            continue
        if ent.is_dir():
            os.mkdir(d)
        else:
            os.close(os.open(d, os.O_CREAT | os.O_WRONLY, 0o600))
        mount(ent.path, d, None, MS_BIND | MS_REC)


def nearest_dir(p):
    while not os.path.isdir(p):
        p = os.path.dirname(p)
    return p


def mirror(d):
    # Replace d by a tmpfs that re-exposes d's entries, so new mount points can be made in it.
    global stage_n
    stage_n += 1
    stage = "/run/.sim-stage/%d" % stage_n
    os.makedirs(stage)
    mount(d, stage, None, MS_BIND | MS_REC)
    tmpfs(d, os.stat(stage).st_mode & 0o7777)
    populate(stage, d)


def main():
    spec = json.loads(sys.argv[1])
    argv = sys.argv[2:]
    # Join the container's cgroup first: every open from here on is attributed.
    with open(spec["cgroup_procs"], "w") as f:
        f.write(str(os.getpid()))
    # unshare(1) made the namespace private already; make sure nothing propagates back.
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    targets = [(os.path.realpath(t), t, src) for t, src in spec["mounts"]]
    # A fresh /run (as in a container) so mount points are never created on the host.
    tmpfs("/run", 0o755)
    if any(not os.path.exists(r) and nearest_dir(os.path.dirname(r)) == "/" for r, _, _ in targets):
        # A new top-level dir: "/" cannot be over-mounted in place, so build a copy of
        # the root on a tmpfs (entries bind-mounted) and chroot into it.
        root = "/run/.sim-root"
        os.mkdir(root)
        tmpfs(root, 0o755)
        populate("/", root, skip=("run",))
        os.mkdir(root + "/run")
        os.chroot(root)
        os.chdir("/")
        tmpfs("/run", 0o755)
    for real, target, source in targets:
        if os.path.isfile(source):
            # A single file (subPath): a file mount point in a dir we may write to.
            parent = os.path.dirname(real)
            if not os.path.isfile(real):
                anc = nearest_dir(parent)
                if os.stat(anc).st_dev not in ours:
                    mirror(anc)
                os.makedirs(parent, exist_ok=True)
                os.close(os.open(real, os.O_CREAT | os.O_WRONLY, 0o644))
            mount(source, real, None, MS_BIND)
        else:
            if not os.path.isdir(real):
                anc = nearest_dir(real)
                if os.stat(anc).st_dev not in ours:
                    mirror(anc)
                os.makedirs(real)
            mount(source, real, None, MS_BIND | MS_REC)
        # The kubelet mounts ConfigMap/Secret/projected volumes read-only.
        mount(None, real, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    if spec.get("cwd"):
        os.chdir(spec["cwd"])
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
