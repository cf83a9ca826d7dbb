"""The registry's one inotify instance: a watch per dir, and roots that do
not exist yet, waited for on their nearest existing ancestor."""

from __future__ import annotations

import errno
import logging
import os
from typing import Callable

from inotify_simple import INotify, flags as F

from tapio_node.host import is_real_dir
from tapio_node.pods.oddnames import OddNames

WATCH_MASK = (F.CREATE | F.DELETE | F.MOVED_FROM | F.MOVED_TO
              | F.DELETE_SELF | F.MOVE_SELF | F.ONLYDIR | F.DONT_FOLLOW)


class Watches:
    def __init__(self, log: logging.Logger, odd: OddNames) -> None:
        self._log = log
        self._odd = odd
        self._ino: INotify | None = None
        self._wd_path: dict[int, str] = {}
        self._path_wd: dict[str, int] = {}
        self._waiting: dict[str, tuple[int, str]] = {}  # missing root -> (wd, ancestor)

    @property
    def active(self) -> bool:
        return self._ino is not None

    def open(self) -> None:
        if self._ino is None:
            self._ino = INotify(nonblocking=True)

    def filenos(self) -> list[int]:
        return [self._ino.fileno()] if self._ino is not None else []

    def close(self) -> None:
        if self._ino is not None:
            self._ino.close()
            self._ino = None
        self._wd_path.clear()
        self._path_wd.clear()
        self._waiting.clear()

    def watch(self, path: str) -> None:
        if path in self._path_wd or self._ino is None:
            return
        try:
            wd = self._ino.add_watch(path, WATCH_MASK)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                self._odd.skip(f"unwatchable dir ({e.strerror})", path)
            return
        self._wd_path[wd] = path
        self._path_wd[path] = wd

    def unwatch(self, path: str) -> None:
        wd = self._path_wd.pop(path, None)
        if wd is not None:
            self._wd_path.pop(wd, None)
            try:
                self._ino.rm_watch(wd)
            except OSError:
                pass  # already gone with its dir

    def wait_for(self, root: str) -> None:
        # Watch the nearest existing ancestor so the root is picked up when
        # it is created; resync retries too (a mount does not notify).
        parent = os.path.dirname(root)
        while parent != "/" and not is_real_dir(parent):
            parent = os.path.dirname(parent)
        if self._ino is None or self._waiting.get(root, (0, ""))[1] == parent:
            return
        first = root not in self._waiting
        self.stop_waiting(root)
        try:
            wd = self._ino.add_watch(parent, WATCH_MASK)
        except OSError as e:
            self._log.warning("pods: cannot watch %s for %s to appear: %s", parent, root, e.strerror)
            return
        self._waiting[root] = (wd, parent)
        if first:
            self._log.warning("pods: %s does not exist yet; waiting for it", root)

    def attach(self, root: str) -> bool:
        """Watch root if it is a real dir (True); else wait for it to appear (False)."""
        if not is_real_dir(root):
            self.wait_for(root)
            return False
        self.stop_waiting(root)
        self.watch(root)
        return True

    def stop_waiting(self, root: str) -> None:
        wd, _ = self._waiting.pop(root, (None, ""))
        # The same dir may be watched for the other root or the tree.
        if (wd is not None and self._ino is not None and wd not in self._wd_path
                and all(w != wd for w, _ in self._waiting.values())):
            try:
                self._ino.rm_watch(wd)
            except OSError:
                pass

    def drain(self, handle: Callable[[str, object], None]) -> bool:
        """Pass each queued event on a watched dir to handle(dir, event), in
        order; True when a full rescan is due (the queue overflowed, or a
        root waited for appeared)."""
        if self._ino is None:
            return False
        rescan = False
        for ev in self._ino.read(timeout=0):
            if ev.mask & F.Q_OVERFLOW:
                rescan = True
                continue
            for root, (wd, anc) in self._waiting.items():
                if wd == ev.wd and ev.name == _next_part(anc, root):
                    rescan = True
            if ev.mask & F.IGNORED:
                path = self._wd_path.pop(ev.wd, None)
                if path is not None and self._path_wd.get(path) == ev.wd:
                    del self._path_wd[path]
                for root in [r for r, (w, _) in self._waiting.items() if w == ev.wd]:
                    del self._waiting[root]
                continue
            parent = self._wd_path.get(ev.wd)
            if parent is not None:
                handle(parent, ev)
        return rescan


def _next_part(ancestor: str, root: str) -> str:
    rest = root[len(ancestor):].lstrip("/")
    return rest.split("/", 1)[0]
