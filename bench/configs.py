"""The configurations compared side by side: nothing attached, the real
tapio-node daemon (stdout sink, metrics only, syscall sampling), the naive
bpftrace filename-prefix match, and auditd (no rules, a read watch).

Each is started before a round's workloads and stopped after them, so a
configuration never measures another one's leftovers. auditd is special:
once audit has been enabled, every process forked while no `never,task`
rule is loaded pays audit's per-syscall cost until it exits, so the auditd
configurations run last (see AuditSession).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from bench import procs

ACCESS_METRIC = re.compile(r"^kernel_monitor_(configmap|secret|projected)_access(_total)?$")
DROP_METRIC = re.compile(r"^kernel_monitor_ring_buffer_drops(_total)?$")
LATENCY_METRIC = "kernel_monitor_event_latency_seconds"
LOST_METRIC = "kernel_monitor_events_lost_total"


class Config:
    name = "?"
    phase = "main"        # "main" or "audit" (run last)
    kind = "baseline"
    pid = None            # the process doing the tracing, when there is one
    note = ""
    backend = "-"         # tapio-node's hook backend, as its /healthz says

    def start(self, env):
        pass

    def stop(self):
        pass

    def counters(self):
        """{'events': n, 'drops': n} seen by the tracer so far, or None."""
        return None

    def describe(self):
        return {"name": self.name, "kind": self.kind, "phase": self.phase, "note": self.note,
                "backend": self.backend}


class Baseline(Config):
    name = "baseline"
    note = "nothing attached"


class Tapio(Config):
    """The real daemon: `python -m tapio_node run --config F --output X`."""

    kind = "tapio"

    def __init__(self, name, output, sampling=0, stdout=None, note="", config=None):
        self.name = name
        self.output = output
        self.sampling = sampling
        self.config = dict(config or {})   # more kernel_collector keys
        self.stdout_target = stdout   # None: /dev/null; a callable: gets the pipe
        self.note = note
        self.proc = None
        self.reader = None
        self.ready_s = None
        self._n = 0

    def write_config(self, env):
        self._n += 1
        tag = f"{os.getpid()}-{self.name}-{self._n}"
        self.port = procs.free_port()
        self.pin = f"/sys/fs/bpf/tapio-bench-{tag}"
        path = os.path.join(env.tmp, f"tapio-{tag}.yaml")
        with open(path, "w") as f:
            f.write(env.node.config_yaml(
                name=f"bench-{self.name}", listen_address=f"127.0.0.1:{self.port}",
                pin_path=self.pin, syscall_sampling_rate=self.sampling, **self.config))
        self.config_path = path
        self.log_path = os.path.join(env.tmp, f"tapio-{tag}.log")
        return path

    def start(self, env, ready_timeout=120.0):
        self.write_config(env)
        argv = [sys.executable, "-m", "tapio_node", "run",
                "--config", self.config_path, "--output", self.output]
        pipe = callable(self.stdout_target)
        self.log = open(self.log_path, "w")
        # sd_notify as systemd would see it: time to READY=1 as well as /healthz
        notify_path = self.config_path + ".notify"
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(notify_path)
        self.ready_notify_s = None
        t0 = time.monotonic()

        def on_notify():
            try:
                while self.ready_notify_s is None:
                    msg = notify.recv(4096).decode(errors="replace")
                    if "READY=1" in msg.split("\n"):
                        self.ready_notify_s = time.monotonic() - t0
            except OSError:
                pass

        threading.Thread(target=on_notify, daemon=True).start()
        self.notify = notify
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe else subprocess.DEVNULL,
            stderr=self.log, cwd=env.repo, preexec_fn=procs.die_with_parent,
            env={**os.environ, "NOTIFY_SOCKET": notify_path})
        self.pid = self.proc.pid
        if pipe:
            self.reader = threading.Thread(target=self.stdout_target, args=(self.proc.stdout,),
                                           daemon=True)
            self.reader.start()
        url = f"http://127.0.0.1:{self.port}/healthz"

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"tapio-node exited with {self.proc.returncode} before it was ready; "
                    f"its log ({self.log_path}):\n{procs.tail(self.log_path)}")
            return procs.http_get(url, timeout=1.0)[0] == 200

        procs.wait_until(ready, ready_timeout, interval=0.005, what="tapio-node /healthz 200")
        self.ready_s = time.monotonic() - t0
        self.backend = json.loads(procs.http_get(url, timeout=5.0)[1])["backend"]

    def metrics(self):
        status, body = procs.http_get(f"http://127.0.0.1:{self.port}/metrics", timeout=5.0)
        if status != 200:
            raise RuntimeError(f"GET /metrics from tapio-node: {status} {body[:200]}")
        return body

    def counters(self):
        out = {"events": 0, "drops": 0, "latency_buckets": [], "names": [], "lost": {}}
        for fam in text_string_to_metric_families(self.metrics()):
            out["names"].append(fam.name)
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                if ACCESS_METRIC.match(s.name):
                    out["events"] += s.value
                elif DROP_METRIC.match(s.name):
                    out["drops"] += s.value
                elif s.name == LOST_METRIC and s.value:
                    out["lost"][s.labels["reason"]] = s.value
                elif s.name == LATENCY_METRIC + "_bucket":
                    out["latency_buckets"].append((float(s.labels["le"]), s.value))
        return out

    def stop(self):
        try:
            rc = procs.stop(self.proc)
            if rc not in (0, None, -signal.SIGTERM):
                with open(self.log_path, errors="replace") as f:
                    tail = "".join(f.readlines()[-8:])
                print(f"  note: tapio-node ({self.name}) exited with {rc}; its log ends:\n{tail}",
                      file=sys.stderr)
            if self.reader:
                self.reader.join(timeout=10)
        finally:
            self.proc = None
            self.pid = None
            if getattr(self, "log", None):
                self.log.close()
            if getattr(self, "notify", None):
                self.notify.close()
                self.notify = None
            # the daemon should unpin on a clean exit; never leave ours behind
            if getattr(self, "pin", None) and os.path.exists(self.pin):
                shutil.rmtree(self.pin, ignore_errors=True)


class Bpftrace(Config):
    """The naive design: read openat's filename string, compare prefixes."""

    kind = "bpftrace"

    def __init__(self, name, print_events):
        self.name = name
        self.print_events = print_events
        self.note = ("prefix match on openat's filename, printing each event" if print_events
                     else "prefix match on openat's filename, counting only")
        self.proc = None

    def script(self, prefixes):
        # str(..., 64): a long enough prefix; a naive tool reads the string twice
        cond = " || ".join(
            f'strncmp(str(args->filename, 64), "{p}", {len(p)}) == 0' for p in prefixes)
        action = ('printf("%d %s %s\\n", pid, comm, str(args->filename, 64));'
                  if self.print_events else "@hits = count();")
        return ("tracepoint:syscalls:sys_enter_openat\n"
                f"/ {cond} /\n{{ {action} }}\n")

    def start(self, env):
        self.out_path = os.path.join(env.tmp, f"bpftrace-{self.name}.out")
        script = os.path.join(env.tmp, f"bpftrace-{self.name}.bt")
        with open(script, "w") as f:
            f.write(self.script(env.naive_prefixes))
        self.lines = 0
        self.proc = subprocess.Popen(
            ["bpftrace", "-B", "full", script], stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=procs.die_with_parent)
        self.pid = self.proc.pid
        attached = threading.Event()

        def drain(pipe):
            # the consumer a user would have: read everything, keep nothing
            buf = b""
            for chunk in iter(lambda: pipe.read1(65536), b""):
                if not attached.is_set():
                    buf += chunk
                    if b"Attaching" in buf:
                        attached.set()
                        self.first = buf
                self.lines += chunk.count(b"\n")
                self.last = chunk[-4096:]
            attached.set()

        self.reader = threading.Thread(target=drain, args=(self.proc.stdout,), daemon=True)
        self.reader.start()
        attached.wait(60)
        if self.proc.poll() is not None or not attached.is_set():
            raise RuntimeError(f"bpftrace did not attach: {getattr(self, 'first', b'')!r}")
        # "Attaching" is printed before the attach; wait for the program to be live
        time.sleep(0.5)

    def counters(self):
        return None

    def stop(self):
        try:
            procs.stop(self.proc, sig=signal.SIGINT)
            self.reader.join(timeout=10)
        finally:
            self.proc = None
            self.pid = None

    def stop_and_count(self):
        """Stop, then {'events', 'lost'} from bpftrace's own output."""
        before = self.lines
        self.stop()
        tail = getattr(self, "last", b"").decode(errors="replace")
        hits = re.search(r"@hits: (\d+)", tail)
        lost = sum(int(x) for x in re.findall(r"Lost (\d+) events", tail))
        events = int(hits.group(1)) if hits else max(0, before - 1)
        return {"events": events, "drops": lost}


class AuditSession:
    """Owns auditd for the audit phase.

    Why `never,task`: the kernel gives each new task an audit context (and
    the per-syscall audit hooks) once audit has ever been enabled, unless a
    `never,task` rule matches at fork. Loading that rule before auditd
    enables audit, and whenever no audit configuration is measuring, keeps
    the cost on the processes forked during the audit measurements only,
    instead of on every process until reboot. It is left loaded at the end.
    """

    def __init__(self, env):
        self.env = env
        self.proc = None

    @staticmethod
    def available():
        if not (shutil.which("auditd") and shutil.which("auditctl")):
            return "auditd/auditctl not installed (apt-get install auditd)"
        st = subprocess.run(["auditctl", "-s"], capture_output=True, text=True)
        if st.returncode != 0:
            return f"auditctl -s failed: {st.stderr.strip()}"
        m = re.search(r"^pid (\d+)", st.stdout, re.M)
        if m and m.group(1) != "0":
            return f"an audit daemon (pid {m.group(1)}) is already running: not touching it"
        return None

    @staticmethod
    def ctl(*args):
        r = subprocess.run(["auditctl", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"auditctl {' '.join(args)}: {r.stderr.strip() or r.stdout}")
        return r.stdout

    def shield(self):
        """No new task gets an audit context."""
        self.ctl("-D")
        self.ctl("-a", "task,never")

    def start(self):
        d = os.path.join(self.env.tmp, "audit")
        os.makedirs(os.path.join(d, "plugins.d"), exist_ok=True)
        conf = os.path.join(d, "auditd.conf")
        with open(conf, "w") as f:
            f.write(f"""local_events = yes
write_logs = yes
log_file = {d}/audit.log
log_format = ENRICHED
flush = INCREMENTAL_ASYNC
freq = 50
max_log_file = 200
max_log_file_action = ROTATE
num_logs = 2
space_left = 75
space_left_action = IGNORE
admin_space_left = 50
admin_space_left_action = IGNORE
disk_full_action = IGNORE
disk_error_action = IGNORE
plugin_dir = {d}/plugins.d
""")
        os.chmod(conf, 0o640)
        self.shield()
        self.log = open(os.path.join(d, "auditd.stderr"), "w")
        # -n: stay in the foreground so we own the pid; it enables audit
        # on start and disables it on SIGTERM
        self.proc = subprocess.Popen(["auditd", "-n", "-c", d], stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=procs.die_with_parent)

        def up():
            if self.proc.poll() is not None:
                raise RuntimeError(f"auditd exited with {self.proc.returncode}: "
                                   f"{procs.tail(self.log.name)}")
            return re.search(rf"^pid {self.proc.pid}$", self.ctl("-s"), re.M) is not None

        procs.wait_until(up, 30, interval=0.05, what="auditd registered with the kernel")

    def stop(self):
        errors = []
        for step in (self.shield, lambda: procs.stop(self.proc)):
            try:
                step()
            except Exception as e:  # keep cleaning up
                errors.append(str(e))
        if getattr(self, "log", None):
            self.log.close()
        try:
            self.ctl("-e", "0")
        except RuntimeError as e:
            errors.append(str(e))
        self.proc = None
        return errors


class Auditd(Config):
    phase = "audit"
    kind = "auditd"

    def __init__(self, name, watch):
        self.name = name
        self.watch = watch
        self.note = ("auditd, -w <volume dir> -p r" if watch else "auditd running, no rules")

    def start(self, env):
        s = self.session = env.audit
        self.pid = s.proc.pid
        s.ctl("-D")             # drops the never,task shield
        if self.watch:
            for d in env.audit_watch_dirs:
                s.ctl("-w", d, "-p", "r", "-k", "tapio-bench")

    def stop(self):
        self.session.shield()
        self.pid = None


class AuditBaseline(Baseline):
    """The baseline of the audit phase: auditd up, never,task loaded."""

    name = "baseline-audit"
    phase = "audit"
    note = "nothing attached (auditd up, never,task rule)"

    def start(self, env):
        env.audit.shield()
