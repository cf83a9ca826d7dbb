"""Kubelet volume paths and the file keys found in them (the names
themselves are checked by tapio_node.k8snames).

parse_volume_path has a Cython twin in _fast; TAPIO_PURE_PYTHON=1 selects
this one everywhere (tests run both).
"""
from __future__ import annotations


from tapio_node import accelerated


def _py_parse_volume_path(path: str, pods_root: str):
    """'<pods_root>/<uid>/volumes/<plugin>/<volume>[/<key>]' ->
    (uid, plugin, volume, key or ''), or None."""
    root = pods_root.rstrip("/") or "/"
    if not path.startswith(root + "/"):
        return None
    parts = path[len(root) + 1:].split("/", 4)
    if len(parts) < 4 or parts[1] != "volumes" or not all(parts[:4]):
        return None
    key = parts[4].rstrip("/") if len(parts) == 5 else ""
    return parts[0], parts[2], parts[3], key


parse_volume_path = accelerated("parse_volume_path", _py_parse_volume_path)


def key_from_dnames(dnames: tuple[str, ...]) -> str | None:
    """The user-visible key of a file matched by device or parent dir,
    from its name and its parents' (nearest first): the names below the
    atomic writer's '..<timestamp>' dir."""
    names = []
    for name in dnames:
        if name.startswith(".."):
            return "/".join(reversed(names)) if names else None
        if not name or name == "/":
            break
        names.append(name)
    return dnames[0] if dnames and dnames[0] and not dnames[0].startswith("..") else None
