"""/healthz says "degraded" while a loss counter grows, and only then."""
import threading
from types import SimpleNamespace

from tapio_node.daemon import Daemon
from tapio_node.metrics import LOSS_RECENT_SECONDS


def test_losing_names_the_reasons_that_grew_recently():
    d = SimpleNamespace(_loss_seen={}, _loss_grew={}, _loss_lock=threading.Lock())
    losing = lambda lost, now: Daemon._losing(d, lost, now)  # noqa: E731
    assert losing({"fd_race": 0, "unresolved": 0}, 100.0) == []
    assert losing({"fd_race": 2, "unresolved": 0}, 101.0) == ["fd_race"]
    assert losing({"fd_race": 2, "unresolved": 5}, 102.0) == ["fd_race", "unresolved"]
    # No growth for a while: healthy again.
    assert losing({"fd_race": 2, "unresolved": 5}, 102.0 + LOSS_RECENT_SECONDS) == []
    assert losing({"fd_race": 3, "unresolved": 5}, 200.0 + LOSS_RECENT_SECONDS) == ["fd_race"]
