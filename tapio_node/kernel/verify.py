"""Load every program of the BPF object through this kernel's verifier
(`make verify`); exit 1 naming the first one the verifier rejects."""
import os
import sys

from tapio_node.kernel import backends, compat
from tapio_node.kernel.loader import object_path, tracepoint_exists, TRACEPOINT_OF


def unloadable(names: list[str], avail: dict[str, backends.Availability]) -> dict[str, str]:
    """Programs this kernel cannot take at all, and why: a tracepoint it
    lacks, or a hook backend it does not allow."""
    out = {n: "no tracepoint" for n in names if n in TRACEPOINT_OF and not tracepoint_exists(TRACEPOINT_OF[n])}
    for b, prog in backends.HOOK_PROGRAMS.items():
        if prog in names and not avail[b].ok:
            out[prog] = f"{b} backend not available"
    return out


def main() -> int:
    """Every program is loaded, also those the daemon would leave off for a
    missing kernel feature: the compat code must keep the object loadable."""
    from tapio_node import _fast

    features = compat.probe()
    for feature in features.values():
        print(feature.describe())
    paths = [object_path(features)]
    if features[compat.RDONLY_CAST].available:
        # The kfunc-free build must load on new kernels too.
        paths.append(object_path({**features, compat.RDONLY_CAST: compat.Feature(
            name=compat.RDONLY_CAST, available=False, since="", uses="")}))
    avail = backends.probe(features)
    for path in paths:
        rc = _verify(_fast, path, avail)
        if rc:
            return rc
    return 0


def _verify(_fast, path: str, avail) -> int:
    name = os.path.basename(path)
    for stash in (0, 1):
        obj = _fast.BpfObject(path)
        obj.set_u32(".rodata", "use_enter_stash", stash)
        obj.set_u32(".rodata", "sampling_rate", 100)
        names = obj.programs()
        skipped = unloadable(names, avail)
        for n in names:
            obj.set_autoload(n, n not in skipped)
        try:
            obj.load()
        except _fast.BpfError as exc:
            print(f"verifier rejected {name} (use_enter_stash={stash}): {exc}", file=sys.stderr)
            return 1
        obj.close()
        print(f"{name} use_enter_stash={stash}: {len(names) - len(skipped)} programs verified"
              + (" (" + "; ".join(f"{n} skipped: {why}" for n, why in skipped.items()) + ")"
               if skipped else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
