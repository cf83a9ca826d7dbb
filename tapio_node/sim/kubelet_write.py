"""The simulated kubelet's volume update: an atomic write as comm "kubelet"
in the kubelet's own cgroup.

    python -I -S kubelet_write.py < SPEC_JSON

SPEC is ``{"cgroup_procs": path, "repo": dir holding tapio_node, "target":
volume dir, "files": {key: base64 content}}``. Prints ``{"written",
"cgroup" (v2 path), "comm"}`` as JSON.
"""

import base64
import ctypes
import json
import os
import sys


def main():
    spec = json.loads(sys.stdin.read())
    with open(spec["cgroup_procs"], "w") as f:
        f.write(str(os.getpid()))
    ctypes.CDLL(None).prctl(15, b"kubelet", 0, 0, 0)  # PR_SET_NAME: comm as on a real node
    sys.path.insert(0, spec["repo"])
    from tapio_node.sim.atomic_writer import atomic_write

    files = {k: base64.b64decode(v) for k, v in spec["files"].items()}
    written = atomic_write(spec["target"], files)
    with open("/proc/self/cgroup") as f:
        cgroup = [line.strip()[3:] for line in f if line.startswith("0::")]
    with open("/proc/self/comm") as f:
        comm = f.read().strip()
    print(json.dumps({"written": written, "cgroup": cgroup[0] if cgroup else None, "comm": comm}))


if __name__ == "__main__":
    main()
