"""The access store on a real SQLite file: aggregation, batched writes by
the writer thread, schema version, retention, and failures that are
counted while adding goes on."""
import os
import sqlite3
import stat

import pytest

from tapio_node.config import ConfigError, duration_seconds, parse_config
from tapio_node.store import AccessStore, StoreError, open_ro, schema


def key(reader="web", obj="web-tls", file="tls.key", kind="secret"):
    return ("shop", "web-1", "uid-1", "Deployment/web", kind, kind, obj, "certs", file,
            "pod", "shop", f"Deployment/{reader}", f"{reader}-1", "c" * 64, "", "nginx")


class Clock:
    def __init__(self, t=1_000_000.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def state(tmp_path):
    return str(tmp_path / "state")


def opened(state, clock=None, **kw):
    st = AccessStore(state, 90, kw.pop("learning", 0.0), clock=clock or Clock(), **kw)
    assert st.open()
    st.start()
    return st


def rows(state):
    with sqlite3.connect(schema.db_path(state)) as c:
        return c.execute("SELECT object_name, key, accessor_workload, count, first_seen, last_seen "
                         "FROM accesses ORDER BY 1, 2, 3").fetchall()


def test_accesses_aggregate_into_one_row_per_key_and_batch(state):
    st = opened(state)
    for i in range(1000):
        st.add(key(), False, 2, 10.0 + i, 11.0 + i)
    st.add(key(file="tls.crt"), False, 1, 5.0, 5.0)
    st.tick()
    st.add(key(), False, 1, 3000.0, 3001.0)
    st.close()
    assert rows(state) == [("web-tls", "tls.crt", "Deployment/web", 1, 5.0, 5.0),
                           ("web-tls", "tls.key", "Deployment/web", 2001, 10.0, 3001.0)]
    assert st.writes == 2 and st.up


def test_mount_inventory_keeps_first_and_last_mounted(state):
    clock = Clock(100.0)
    st = opened(state, clock)
    row = ("uid-1", "certs", "tls.key", "secret", "web-tls", "shop", "web-1", "Deployment/web", "secret")
    st.mounted([row])
    st.tick()
    st.close()
    clock.t = 200.0
    st = opened(state, clock)
    st.mounted([row])
    st.close()
    with sqlite3.connect(schema.db_path(state)) as c:
        assert c.execute("SELECT first_mounted, last_mounted FROM mounts").fetchall() == [(100.0, 200.0)]
    assert ("shop", "secret", "web-tls") in st.mounted_objects


def test_history_survives_a_restart_and_learning_is_not_restarted(state):
    clock = Clock(1000.0)
    seen = []
    st = opened(state, clock, learning=50.0, on_new_reader=lambda p, k: seen.append(p))
    st.add(key(), False, 1, 1001.0, 1001.0)
    st.close()
    clock.t = 2000.0
    st = opened(state, clock, learning=50.0, on_new_reader=lambda p, k: seen.append(p))
    assert st.learning_until == 1050.0
    assert st.last_access[("shop", "secret", "web-tls")] == 1001.0
    st.add(key(), False, 1, 2001.0, 2001.0)               # known pair: no alert
    st.add(key(reader="batch"), False, 1, 2002.0, 2002.0)  # new pair after learning
    st.add(key(reader="batch", file="tls.crt"), False, 1, 2003.0, 2003.0)  # same pair
    st.close()
    assert [p[2] for p in seen] == ["Deployment/batch"]
    assert rows(state)[-1][3] == 2


def test_no_alert_for_the_kubelet(state):
    seen = []
    st = opened(state, Clock(1000.0), learning=0.0, on_new_reader=lambda p, k: seen.append(p))
    k = key()
    st.add(k[:9] + ("kubelet", "", "kubelet", "", "", "", "kubelet"), False, 1, 1001.0, 1001.0)
    st.add(key(reader="batch"), False, 1, 1001.0, 1001.0)
    st.close()
    assert [p[0] for p in seen] == ["pod"]


def test_no_alert_within_the_learning_period(state):
    seen = []
    st = opened(state, Clock(1000.0), learning=3600.0, on_new_reader=lambda p, k: seen.append(p))
    st.add(key(reader="batch"), False, 1, 1001.0, 1001.0)
    st.close()
    assert seen == []


def test_retention_prunes_rows_not_seen_for_retention_days(state):
    clock = Clock(100 * 86400.0)
    st = opened(state, clock)
    st.add(key(file="old"), False, 1, 1.0, 5 * 86400.0)
    st.add(key(file="new"), False, 1, 1.0, 99 * 86400.0)
    st.close()   # the first write prunes, then once every PRUNE_SECONDS
    assert [r[1] for r in rows(state)] == ["new"]
    clock.t += 95 * 86400.0
    st = opened(state, clock)
    assert st.prune() == 1
    st.close()
    assert rows(state) == []


def test_a_newer_schema_is_refused_not_rewritten(state):
    os.makedirs(state)
    with sqlite3.connect(schema.db_path(state)) as c:
        c.execute(f"PRAGMA user_version={schema.SCHEMA_VERSION + 1}")
    st = AccessStore(state, 90, 0.0)
    assert not st.open()
    assert st.errors["open"] == 1 and "newer" in st.last_error
    with pytest.raises(StoreError, match="newer"):
        open_ro(state)


def test_a_read_only_state_dir_is_counted_and_adding_goes_on(state):
    if os.geteuid() == 0:
        pytest.skip("root writes into a read-only dir; tests/kernel/test_store.py covers it with a ro mount")
    os.makedirs(state)
    os.chmod(state, stat.S_IRUSR | stat.S_IXUSR)
    st = AccessStore(state, 90, 0.0)
    assert not st.open()
    st.start()
    st.add(key(), False, 1, 1.0, 1.0)
    st.tick()
    st.close()
    assert st.errors["open"] >= 2 and not st.up


def test_a_corrupt_file_is_counted_and_rows_are_kept_for_the_next_try(state):
    os.makedirs(state)
    with open(schema.db_path(state), "wb") as f:
        f.write(b"not a database" * 100)
    st = AccessStore(state, 90, 0.0)
    assert not st.open()
    st.add(key(), False, 3, 1.0, 2.0)
    st._write(st._pending, None, 3.0)   # the writer's step, run here to see the retry kept
    assert st.errors["open"] == 2 and st._retry[key()][0] == 3
    os.remove(schema.db_path(state))
    st._write({key(): [1, 4.0, 5.0, False]}, None, 6.0)
    assert st.up
    st.close()
    assert rows(state)[0][3:] == (4, 1.0, 5.0)


def test_rows_beyond_the_cap_are_dropped_and_counted(state):
    st = AccessStore(state, 90, 0.0, max_pending=2)
    for f in ("a", "b", "c"):
        st.add(key(file=f), False, 1, 1.0, 1.0)
    assert st.rows_dropped == 1


def test_report_reader_opens_read_only(state):
    st = opened(state)
    st.add(key(), False, 1, 1.0, 1.0)
    st.close()
    conn = open_ro(state)
    with pytest.raises(sqlite3.OperationalError):
        conn.execute("DELETE FROM accesses")


def test_config_keys():
    kc = parse_config("kernel_collector:\n  state_path: /srv/tapio\n  retention_days: 7\n"
                      "  learning_period: 10m\n").kernel_collector
    assert (kc.state_path, kc.retention_days, duration_seconds(kc.learning_period)) == ("/srv/tapio", 7, 600)
    defaults = parse_config("").kernel_collector
    assert (defaults.state_path, defaults.retention_days, duration_seconds(defaults.learning_period)) == \
        ("/var/lib/tapio-node", 90, 86400)
    for body, k in (("state_path: relative", "state_path"), ("retention_days: 0", "retention_days"),
                    ("learning_period: soon", "learning_period"), ("learning_period: -5", "learning_period")):
        with pytest.raises(ConfigError, match=f"kernel_collector.{k}"):
            parse_config(f"kernel_collector:\n  {body}\n")


@pytest.mark.parametrize("text, seconds", [(30, 30), ("30s", 30), ("10m", 600), ("24h", 86400),
                                           ("7d", 604800), ("1.5h", 5400), ("2w", 1209600)])
def test_durations(text, seconds):
    assert duration_seconds(text) == seconds


def test_the_per_node_gauges_and_reads_counter(state):
    from prometheus_client import generate_latest

    from prometheus_client.parser import text_string_to_metric_families

    from tapio_node.metrics import Metrics

    st = opened(state)
    m = Metrics(max_series=100)
    m.register_store(st)
    st.mounted([("uid-1", "certs", "tls.key", "secret", "web-tls", "shop", "web-1", "Deployment/web", "secret"),
                ("uid-1", "kube-api-access-ab1cd", "namespace", "downwardAPI", "kube-api-access-ab1cd",
                 "shop", "web-1", "Deployment/web", "projected")])
    st.add(key(), False, 2, 10.0, 11.0)
    st.add(key(reader="snoop"), True, 1, 12.0, 12.5)
    st.tick()   # the totals and gauges follow each hand-off to the writer
    st.add(key(), False, 1, 13.0, 14.0)
    st.close()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(generate_latest(m.registry).decode())
               for s in fam.samples}
    obj = (("kind", "secret"), ("name", "web-tls"), ("namespace", "shop"))
    assert samples[("kernel_monitor_volume_mounted", obj)] == 1
    assert samples[("kernel_monitor_last_access_timestamp_seconds", obj)] == 14.0
    assert not [k for k in samples if k[0] == "kernel_monitor_volume_mounted" and "downwardAPI" in str(k)]
    reads = {dict(k[1])["reader_workload"]: (v, dict(k[1])["cross_pod"])
             for k, v in samples.items() if k[0] == "kernel_monitor_object_reads_total"}
    assert reads == {"Deployment/web": (3, "false"), "Deployment/snoop": (1, "true")}
    assert samples[("kernel_monitor_store_up", ())] == 1
    assert samples[("kernel_monitor_store_writes_total", ())] == 2


def test_an_empty_state_path_turns_the_store_off():
    assert parse_config('kernel_collector:\n  state_path: ""\n').kernel_collector.state_path == ""


def test_an_inventory_writes_only_its_difference(state):
    clock = Clock(100.0)
    st = opened(state, clock)
    a, b, c = (("uid-1", "certs", k, "secret", "web-tls", "shop", "web-1", "Deployment/web", "secret")
               for k in ("a", "b", "c"))
    renamed = a[:5] + ("shop", "web-1", "Deployment/web2", "secret")   # same mount, its names changed
    for t, rows in ((100.0, [a, b]), (130.0, [a]), (160.0, [a, c]), (190.0, [renamed, c])):
        clock.t = t
        st._write({}, rows, t)   # the writer's step, in order
    st.close()
    with sqlite3.connect(schema.db_path(state)) as conn:
        got = conn.execute("SELECT key, workload, first_mounted, last_mounted FROM mounts ORDER BY key").fetchall()
    assert got == [("a", "Deployment/web2", 100.0, 190.0), ("b", "Deployment/web", 100.0, 100.0),
                   ("c", "Deployment/web", 160.0, 190.0)]


def test_an_upgrade_migrates_in_place_and_keeps_the_rows(state, monkeypatch):
    st = opened(state)
    st.add(key(), False, 7, 1.0, 2.0)
    st.close()
    # The next release adds a column: its step runs once, on the old file.
    step = "ALTER TABLE accesses ADD COLUMN note TEXT NOT NULL DEFAULT ''"
    monkeypatch.setattr(schema, "MIGRATIONS", schema.MIGRATIONS + (step,))
    monkeypatch.setattr(schema, "SCHEMA_VERSION", len(schema.MIGRATIONS))
    conn = schema.open_rw(state)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 2
    assert conn.execute("SELECT count, note FROM accesses").fetchall() == [(7, "")]
    conn.close()
    assert schema.migrate(schema.open_rw(state)) == 2   # nothing left to do


def test_a_pod_cannot_grow_the_store_with_random_command_names():
    from tapio_node.store.rows import MAX_COMMANDS, OTHER_COMMANDS, RowKeys

    rk = RowKeys()
    got = [rk.command("c" * 64, f"x{i}") for i in range(MAX_COMMANDS + 10)]
    assert len(set(got)) == MAX_COMMANDS + 1 and got[-1] == OTHER_COMMANDS
    assert rk.command("c" * 64, "x0") == "x0"          # a known one keeps its row
    assert rk.command("d" * 64, "x99") == "x99"        # another container has its own
    assert rk.commands_folded == 10
