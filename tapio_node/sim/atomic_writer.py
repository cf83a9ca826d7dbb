"""The kubelet's AtomicWriter (pkg/volume/util/atomic_writer.go): how a
ConfigMap, Secret or projected volume's files are written and updated.

A volume dir holds one timestamped dir with the payload, a ``..data``
symlink to it, and per top-level key a symlink ``key -> ..data/key``. An
update writes a new timestamped dir and renames a new ``..data`` over the
old one: a reader of a key sees its old or its new content, never a mix.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time

from tapio_node.sim.system import SimulationError

DATA_DIR = "..data"
DATA_TMP = "..data_tmp"


def validate_payload(files: dict[str, bytes]) -> dict[str, bytes]:
    clean = {}
    for key, data in files.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"invalid key {key!r}: must be a non-empty string")
        if key.startswith("/"):
            raise ValueError(f"invalid key {key!r}: must be a relative path")
        if len(key) > 4096:
            raise ValueError(f"invalid key {key[:40]!r}...: longer than 4096 characters")
        items = key.split("/")
        if ".." in items:
            raise ValueError(f"invalid key {key!r}: must not contain '..'")
        if any(len(i) > 255 for i in items):
            raise ValueError(f"invalid key {key!r}: a path element is longer than 255 characters")
        if items[0].startswith("..") and len(items[0]) > 2:
            raise ValueError(f"invalid key {key!r}: must not start with '..' (reserved by the atomic writer)")
        if not isinstance(data, (bytes, bytearray)):
            raise ValueError(f"content of key {key!r} must be bytes, got {type(data).__name__}")
        clean[os.path.normpath(key)] = bytes(data)
    return clean


def _walk_rel(top: str) -> set[str]:
    out = set()
    for d, dirs, fnames in os.walk(top):
        for n in dirs + fnames:
            out.add(os.path.relpath(os.path.join(d, n), top))
    return out


def _new_ts_dir(target: str) -> str:
    # os.MkdirTemp(dir, "..2006_01_02_15_04_05."): UTC time + Go's decimal random suffix.
    prefix = time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime())
    for _ in range(100):
        path = os.path.join(target, prefix + str(secrets.randbits(32)))
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        os.chmod(path, 0o755)
        return path
    raise SimulationError(f"cannot create a timestamped dir in {target}")


def atomic_write(target: str, files: dict[str, bytes], mode: int = 0o644) -> bool:
    """Project ``files`` into ``target`` exactly as the kubelet's AtomicWriter.Write does.

    Returns False (and touches nothing) when the content is unchanged and no
    key disappeared, as the kubelet does.
    """
    payload = validate_payload(files)
    data_link = os.path.join(target, DATA_DIR)
    # (2) the current timestamped dir
    try:
        old_ts = os.readlink(data_link)
    except FileNotFoundError:
        old_ts = ""
    old_ts_path = os.path.join(target, old_ts)
    to_remove: set[str] = set()
    if old_ts:
        # (3) user-visible paths that vanish with this payload
        new_paths = set()
        for key in payload:
            sub = key
            while sub:
                new_paths.add(sub)
                sub = os.path.dirname(sub)
        to_remove = _walk_rel(old_ts_path) - new_paths
        # (4) compare with what is on disk (the kubelet really opens the old files)
        should = False
        for key, data in payload.items():
            old = os.path.join(old_ts_path, key)
            if not os.path.lexists(old):
                should = True
                break
            with open(old, "rb") as f:
                if f.read() != data:
                    should = True
                    break
        if not should and not to_remove:
            return False
    # (5) new timestamped dir, (6) payload into it
    ts_path = _new_ts_dir(target)
    ts_name = os.path.basename(ts_path)
    for key, data in payload.items():
        full = os.path.join(ts_path, key)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        fd = os.open(full, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        os.chmod(full, mode)
    # (7) ..data_tmp -> new dir, (8) renamed over ..data (the atomic switch)
    tmp_link = os.path.join(target, DATA_TMP)
    os.symlink(ts_name, tmp_link)
    os.rename(tmp_link, data_link)
    # (9) a symlink per top-level user-visible entry: k -> ..data/k
    for key in payload:
        top = key.split("/", 1)[0]
        link = os.path.join(target, top)
        if not os.path.islink(link):
            os.symlink(os.path.join(DATA_DIR, top), link)
    # (10) drop vanished top-level entries, (11) remove the old dir
    for rel in to_remove:
        if "/" not in rel:
            os.remove(os.path.join(target, rel))
    if old_ts:
        shutil.rmtree(old_ts_path)
    return True
