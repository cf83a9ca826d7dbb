#!/usr/bin/env python3
"""Install the .deb on a clean Debian 12 root and use it.

    TAPIO_TEST_DEB=1 python -m pytest -m slow tests/packaging/test_deb.py
    python3 tests/packaging/test_deb.py          # the same, as a script

Marked slow and kernel; skipped unless TAPIO_TEST_DEB=1 or CI=true. Needs
root, debootstrap and the network path to the Debian mirror.

1. `make -C packaging deb` (or the .deb named by TAPIO_DEB), then lintian.
2. A minbase bookworm root from debootstrap, from the mirror this machine's
   apt uses. The finished root is cached as a tarball under
   packaging/build/cache/ (it includes systemd, as on a node, for
   `systemd-analyze verify`); later runs only unpack it.
3. Inside chroot: `apt-get install ./tapio-node_*.deb` (apt resolves the
   dependencies; policy-rc.d forbids starting services), then
   `tapio-node --version`, `tapio-node check`, the installed daemon against
   a kubelet-like tree with one Secret volume on tmpfs (one JSON event when
   the file is read), `systemd-analyze verify` of the installed unit.
4. Boot the root with systemd as PID 1
   (`systemd-nspawn -b`) and check the unit for real, with all its
   sandboxing: it becomes active (Type=notify), a read of the Secret file
   shows up in `journalctl -u tapio-node TAPIO_CONFIG_NAME=db-credentials`,
   `systemctl reload` keeps the same main pid, no watchdog restart after
   WatchdogSec, `systemctl stop` is a clean stop; the online
   `systemd-analyze security` score is at most MAX_EXPOSURE (as offline).
5. `apt-get remove` (config and enablement kept, venv gone), then `purge`
   (nothing left).

Every chroot command runs in its own private mount namespace (unshare -m)
with /dev, /proc, /sys, a fresh bpffs instance, tracefs and /run mounted in
it: those mounts, the tmpfs volume and any BPF pins die with the namespace,
whatever happens to this test.
"""
import hashlib
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
BUILD = TOP / "packaging" / "build"
CACHE = BUILD / "cache"
# Where the Debian root is unpacked: the build dir, or TAPIO_DEB_WORKDIR
# (in a matrix VM the checkout is read-only).
WORKDIR = Path(os.environ.get("TAPIO_DEB_WORKDIR") or BUILD)
SUITE = "bookworm"
# Install from packages fetched ahead by --prepare (a matrix VM has no network).
OFFLINE = os.environ.get("TAPIO_DEB_OFFLINE") == "1"
# systemd: a node has it, and `systemd-analyze verify` needs it.
INCLUDE = "systemd"
VENV = "/opt/venvs/tapio-node"
CONFFILE = "/etc/tapio-node/config.yaml"
UNIT = "/lib/systemd/system/tapio-node.service"
WANTS = "/etc/systemd/system/multi-user.target.wants/tapio-node.service"
# `systemd-analyze security` overall exposure of the unit (0 safest, 10
# worst): the unit's sandboxing scores 2.7 under Debian 12's systemd 252,
# both offline and booted. Loosening it fails the test; tightening it
# should lower this.
MAX_EXPOSURE = 2.7

ENABLED = os.environ.get("TAPIO_TEST_DEB") == "1" or os.environ.get("CI") == "true"

CHROOT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "TERM": "dumb",
}

# Runs as `sh -ec SCRIPT sh ROOT PREP CMD...` in a new mount namespace.
# PREP is shell code run after the mounts, before chroot (may be empty).
NS_SCRIPT = r"""
R=$1; PREP=$2; shift 2
mount --rbind /dev "$R/dev"
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
# A bpffs instance of our own: whatever gets pinned vanishes with it.
mount -t bpf bpf "$R/sys/fs/bpf"
mountpoint -q "$R/sys/kernel/tracing" || mount -t tracefs tracefs "$R/sys/kernel/tracing"
mount -t tmpfs -o mode=755 tmpfs "$R/run"
eval "$PREP"
exec chroot "$R" "$@"
"""


class Failure(AssertionError):
    pass


def log(msg):
    print(f"[test_deb {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(argv, check=True, **kw):
    """Run a host command; on failure raise with its output."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.STDOUT)
    kw.setdefault("text", True)
    p = subprocess.run(argv, **kw)
    if check and p.returncode != 0:
        raise Failure(f"{' '.join(map(str, argv))} exited {p.returncode}:\n{p.stdout}")
    return p


def ns_argv(root, argv, prep=""):
    return ["unshare", "--mount", "--propagation", "private", "--",
            "sh", "-ec", NS_SCRIPT, "sh", str(root), prep, *argv]


def chroot(root, argv, check=True, prep=""):
    return run(ns_argv(root, argv, prep), check=check, env=CHROOT_ENV)


def apt_mirror():
    """The Debian mirror of this machine's apt sources (TAPIO_DEB_MIRROR wins)."""
    if os.environ.get("TAPIO_DEB_MIRROR"):
        return os.environ["TAPIO_DEB_MIRROR"]
    files = [Path("/etc/apt/sources.list")]
    d = Path("/etc/apt/sources.list.d")
    if d.is_dir():
        files += sorted(d.iterdir())
    for f in files:
        if not f.is_file():
            continue
        text = f.read_text(errors="replace")
        if f.suffix == ".sources":  # deb822 stanzas
            for stanza in text.split("\n\n"):
                fields = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.startswith((" ", "#")):
                        k, _, v = line.partition(":")
                        fields[k.strip().lower()] = v.split()
                if SUITE in fields.get("suites", []) and "deb" in fields.get("types", []):
                    return fields["uris"][0]
        elif f.suffix == ".list" or f.name == "sources.list":
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                words = [w for w in words if not w.startswith("[")]
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1]
    raise Failure(f"no '{SUITE}' Debian source in /etc/apt/sources.list*; "
                  "set TAPIO_DEB_MIRROR=http://deb.debian.org/debian")


def mounts_under(path):
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        targets = [line.split()[4] for line in f]
    return [t for t in targets if t == path or t.startswith(path + "/")]


def remove_tree(path):
    """rm -r, refusing if anything is mounted below (it would be deleted)."""
    if not os.path.exists(path):
        return
    left = mounts_under(path)
    if left:
        raise Failure(f"not removing {path}: still mounted there: {left}")
    shutil.rmtree(path)


def base_root_tarball():
    """A minbase bookworm root, made once by debootstrap and kept as a tarball."""
    mirror = apt_mirror()
    key = hashlib.sha256(f"{SUITE} minbase {INCLUDE} {mirror}".encode()).hexdigest()[:12]
    tarball = CACHE / f"{SUITE}-minbase-{key}.tar"
    if tarball.exists():
        log(f"base root: cached {tarball.relative_to(TOP)}")
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="debootstrap-", dir=CACHE)
    try:
        log(f"debootstrap --variant=minbase --include={INCLUDE} {SUITE} from {mirror}")
        t0 = time.monotonic()
        run(["debootstrap", "--variant=minbase", f"--include={INCLUDE}", SUITE, tmp, mirror])
        log(f"debootstrap took {time.monotonic() - t0:.0f} s")
        part = tarball.with_suffix(".tar.part")
        run(["tar", "-C", tmp, "--numeric-owner", "-cf", str(part), "."])
        part.rename(tarball)
    finally:
        remove_tree(tmp)
    return tarball


def apt_cache_tarball(deb, base):
    """The package lists and every .deb that installing `deb` into the base
    root needs, fetched once here: a matrix VM installs offline from them
    (its user network's DNS is not something a test should depend on)."""
    depends = run(["dpkg-deb", "-f", str(deb), "Depends"]).stdout.strip()
    key = hashlib.sha256(f"{base.name} {depends}".encode()).hexdigest()[:12]
    tarball = CACHE / f"{SUITE}-apt-{key}.tar"
    if tarball.exists():
        log(f"apt cache: cached {tarball.relative_to(TOP)}")
        return tarball
    if OFFLINE:
        raise Failure(f"no {tarball.relative_to(TOP)}: run tests/packaging/test_deb.py --prepare "
                      "on the host first (tests/vm/matrix.py does)")
    root = tempfile.mkdtemp(prefix="apt-cache-root-", dir=CACHE)
    try:
        run(["tar", "-C", root, "--numeric-owner", "-xf", str(base)])
        shutil.copy("/etc/resolv.conf", Path(root, "etc/resolv.conf"))
        shutil.copy(deb, Path(root, "tmp", deb.name))
        chroot(root, ["apt-get", "-q", "update"])
        chroot(root, ["apt-get", "install", "-y", "-q", "--download-only", "--no-install-recommends",
                      f"/tmp/{deb.name}"])
        part = tarball.with_suffix(".tar.part")
        run(["tar", "-C", root, "--numeric-owner", "-cf", str(part), "var/lib/apt/lists", "var/cache/apt/archives"])
        part.rename(tarball)
    finally:
        remove_tree(root)
    return tarball


def build_deb():
    if os.environ.get("TAPIO_DEB"):
        deb = Path(os.environ["TAPIO_DEB"]).resolve()
        if not deb.is_file():
            raise Failure(f"TAPIO_DEB={deb} is not a file")
        return deb
    t0 = time.monotonic()
    run(["make", "-C", str(TOP / "packaging"), "deb"], stdout=None, stderr=None)
    log(f"make deb took {time.monotonic() - t0:.0f} s")
    debs = sorted(BUILD.glob("tapio-node_*_amd64.deb"), key=lambda p: p.stat().st_mtime)
    if not debs:
        raise Failure(f"make deb made no tapio-node_*_amd64.deb in {BUILD}")
    return debs[-1]


def lintian(deb):
    p = run(["lintian", "--fail-on", "error,warning", "--info", str(deb)], check=False)
    report = "\n".join(ln for ln in p.stdout.splitlines() if "running with root" not in ln)
    log(f"lintian: exit {p.returncode}{': ' + report if report else ', nothing to report'}")
    if p.returncode != 0:
        raise Failure(f"lintian reported errors or warnings:\n{p.stdout}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dpkg_status(root):
    p = chroot(root, ["dpkg-query", "-W", "-f=${db:Status-Abbrev}", "tapio-node"], check=False)
    return p.stdout.strip() if p.returncode == 0 else "not-known"


def listing(root, rel):
    """Files under ROOT/rel, as paths inside the root."""
    top = Path(root, rel.lstrip("/"))
    if not top.exists():
        return []
    return sorted("/" + str(p.relative_to(root)) for p in [top, *top.rglob("*")])


def expect(cond, what):
    if not cond:
        raise Failure(what)
    log(f"ok: {what}")


def install(root, deb, apt_cache=None):
    shutil.copy(deb, Path(root, "tmp", deb.name))
    # Debian's way to keep maintainer scripts from starting services.
    policy = Path(root, "usr/sbin/policy-rc.d")
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    t0 = time.monotonic()
    if apt_cache is not None:
        # Offline: the lists and packages fetched ahead, so apt needs to get
        # nothing (--no-download cannot be used: apt 2.6 then fails on a
        # local .deb, "Pathname to install is not absolute").
        run(["tar", "-C", root, "--numeric-owner", "-xf", str(apt_cache)])
        p = chroot(root, ["apt-get", "install", "-y", "-q", "--no-install-recommends", f"/tmp/{deb.name}"])
        expect(re.search(r"^Need to get (?!0 B/)", p.stdout, re.M) is None,
               "apt-get install: every package came from the cache")
    else:
        shutil.copy("/etc/resolv.conf", Path(root, "etc/resolv.conf"))
        chroot(root, ["apt-get", "-q", "update"])
        p = chroot(root, ["apt-get", "install", "-y", "-q", "--no-install-recommends", f"/tmp/{deb.name}"])
    log(f"apt-get install took {time.monotonic() - t0:.0f} s")
    for line in p.stdout.splitlines():
        if line.startswith(("Setting up tapio-node", "The following NEW packages")):
            log(f"  {line}")
    expect(dpkg_status(root) == "ii", "dpkg: tapio-node installed (ii)")
    expect(Path(root, "usr/bin/tapio-node").is_symlink(), "/usr/bin/tapio-node is a symlink")
    expect(os.readlink(Path(root, "usr/bin/tapio-node")) == f"{VENV}/bin/tapio-node",
           f"/usr/bin/tapio-node -> {VENV}/bin/tapio-node")
    conffiles = chroot(root, ["dpkg-query", "-W", "-f=${Conffiles}", "tapio-node"]).stdout
    expect(CONFFILE in conffiles, f"{CONFFILE} is a conffile")
    expect(Path(root, WANTS.lstrip("/")).is_symlink(), "unit enabled (multi-user.target.wants link)")
    expect(Path(root, "usr/share/man/man8/tapio-node.8.gz").is_file(), "man page tapio-node(8) installed")
    for shipped in ("prometheus/tapio-node.rules.yaml", "grafana/tapio-node.json"):
        expect(Path(root, "usr/share/tapio-node", shipped).is_file(), f"/usr/share/tapio-node/{shipped} installed")
    site = list(Path(root, VENV.lstrip("/"), "lib").glob("python3.*/site-packages/tapio_node"))
    expect(len(site) == 1 and list(site[0].glob("_fast*.so")), "venv has tapio_node/_fast*.so")
    for obj in ("tapio.bpf.o", "tapio-nokfunc.bpf.o"):
        expect(Path(site[0], "kernel", "obj", obj).is_file(), f"venv has tapio_node/kernel/obj/{obj}")


def check_cli(root):
    version = chroot(root, ["tapio-node", "--version"]).stdout.strip()
    expect(version.startswith("tapio-node ") and version.split()[-1][0].isdigit(),
           f"tapio-node --version: {version!r}")
    p = chroot(root, ["tapio-node", "check", "--config", CONFFILE], check=False)
    log("tapio-node check:\n" + "\n".join("    " + ln for ln in p.stdout.splitlines()))
    expect(p.returncode == 0, f"tapio-node check exits 0 (got {p.returncode})")


def unit_capabilities(root):
    """The CapabilityBoundingSet= of the installed unit, as setpriv wants it."""
    for line in Path(root, UNIT.lstrip("/")).read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            caps = line.split("=", 1)[1].split()
            return ",".join("+" + c.lower().removeprefix("cap_") for c in caps)
    raise Failure(f"{UNIT} has no CapabilityBoundingSet=")


def check_daemon(root, deadline_s=120.0):
    """Run the installed daemon on a kubelet-like tree, read a Secret file
    from inside the same root, expect the event on stdout.

    The daemon runs as the unit would run it: uid 0 with only the unit's
    CapabilityBoundingSet= and NoNewPrivileges= (setpriv), so this also
    proves that capability set is enough."""
    pod_uid = str(uuid.uuid4())
    vol = f"/var/lib/kubelet/pods/{pod_uid}/volumes/kubernetes.io~secret/db-credentials"
    ts_dir = "..2026_11_25_23_00_00.123456789"
    Path(root, "var/log/pods", f"default_web-0_{pod_uid}").mkdir(parents=True)
    Path(root, vol.lstrip("/")).mkdir(parents=True)
    port = free_port()
    cfg = "/etc/tapio-node/test-daemon.yaml"
    Path(root, cfg.lstrip("/")).write_text(
        "kernel_collector:\n"
        f'  listen_address: "127.0.0.1:{port}"\n'
        '  pin_path: "/sys/fs/bpf/tapio-test"\n')
    # The Secret volume on its own tmpfs with the atomic writer's layout,
    # made inside the daemon's mount namespace (gone when it exits).
    prep = (f'V="$R{vol}"; mount -t tmpfs -o mode=755 tmpfs "$V"; '
            f'mkdir "$V/{ts_dir}"; printf s3cret > "$V/{ts_dir}/password"; '
            f'ln -s {ts_dir} "$V/..data"; ln -s ..data/password "$V/password"')
    stderr_path = Path(root, "tmp/daemon.stderr")
    caps = unit_capabilities(root)
    log(f"tapio-node run with only the unit's capabilities: {caps}")
    with open(stderr_path, "w") as err:
        daemon = subprocess.Popen(
            ns_argv(root, ["setpriv", "--bounding-set", "-all," + caps, "--no-new-privs", "--",
                           "tapio-node", "run", "--config", cfg, "--output", "stdout"], prep),
            stdout=subprocess.PIPE, stderr=err, text=True, env=CHROOT_ENV)
    lines = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(ln) for ln in daemon.stdout], daemon=True)
    reader.start()
    try:
        end = time.monotonic() + deadline_s
        while True:
            if daemon.poll() is not None:
                raise Failure(f"tapio-node run exited {daemon.returncode}:\n{stderr_path.read_text()}")
            if time.monotonic() > end:
                raise Failure(f"no secret_access event within {deadline_s:.0f} s; stderr:\n"
                              f"{stderr_path.read_text()}")
            # Read the key through its symlinks, as a container would, in the
            # daemon's own mount namespace (where the tmpfs is). It fails
            # until the namespace and the tmpfs exist.
            cat = run(["nsenter", "--mount", f"--target={daemon.pid}", "--",
                       "chroot", str(root), "cat", f"{vol}/password"],
                      env=CHROOT_ENV, check=False)
            if cat.returncode != 0:
                time.sleep(0.5)
                continue
            try:
                line = lines.get(timeout=1.0)
            except queue.Empty:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                raise Failure(f"tapio-node run wrote a line that is not JSON: {line!r}")
            if event.get("event_type") == "secret_access":
                break
        log(f"event: {json.dumps(event)[:300]}")
        rss = [ln for ln in Path(f"/proc/{daemon.pid}/status").read_text().splitlines()
               if ln.startswith("VmRSS")]
        log(f"daemon {rss[0] if rss else 'VmRSS unknown'} (the unit's MemoryMax=256M)")
        expect(event.get("pod_uid") == pod_uid, "event names the pod uid")
        expect(event.get("volume_name") == "db-credentials", "event names the volume")
        expect(event.get("file") == "password", "event names the file")
        expect(event.get("process", {}).get("command") == "cat", "event names the reader (cat)")
    finally:
        if daemon.poll() is None:
            daemon.terminate()  # by pid: Popen.pid is the daemon (unshare/sh/chroot exec)
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
        reader.join(timeout=5)
    log(f"tapio-node run stopped with exit {daemon.returncode} on SIGTERM")
    expect(daemon.returncode == 0, "tapio-node run exits 0 on SIGTERM")


def reinstall(root, deb):
    """Maintainer scripts must be idempotent: a second configure changes nothing."""
    conf = Path(root, CONFFILE.lstrip("/")).read_bytes()
    chroot(root, ["apt-get", "install", "-y", "-q", "--reinstall", f"/tmp/{deb.name}"])
    expect(dpkg_status(root) == "ii", "reinstall: still installed (ii)")
    expect(Path(root, CONFFILE.lstrip("/")).read_bytes() == conf, "reinstall: conffile untouched")
    expect(Path(root, WANTS.lstrip("/")).is_symlink(), "reinstall: still enabled")


def check_unit(root):
    # --man=no: minbase has no man-db to resolve Documentation=man:...
    p = chroot(root, ["systemd-analyze", "verify", "--man=no", UNIT], check=False)
    out = p.stdout.strip()
    expect(p.returncode == 0 and "tapio-node" not in out,
           f"systemd-analyze verify {UNIT}{': ' + out if out else ''}")
    p = chroot(root, ["systemd-analyze", "security", "--offline=yes", UNIT], check=False)
    check_exposure("systemd-analyze security --offline", p.stdout)


def exposure(text):
    """The overall exposure level in `systemd-analyze security` output, or None."""
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", text or "")
    return float(m.group(1)) if m else None


def check_exposure(what, text):
    score = exposure(text)
    expect(score is not None and score <= MAX_EXPOSURE,
           f"{what}: exposure {score} <= {MAX_EXPOSURE}" + ("" if score is not None else f" ({text[-300:]!r})"))


# Runs inside the booted container as a oneshot unit after tapio-node.
PROBE = r"""#!/bin/sh
exec > /tapio-probe.out 2>&1
VOL=$1
state() { systemctl is-active tapio-node; }
i=0; while [ $i -lt 240 ]; do
    s=$(state); [ "$s" = active ] || [ "$s" = failed ] && break; sleep 0.5; i=$((i+1)); done
echo "ACTIVE=$(state)"
echo "MAINPID1=$(systemctl show -P MainPID tapio-node)"
cat "$VOL/password" >/dev/null
i=0; while [ $i -lt 120 ]; do
    journalctl -q -u tapio-node TAPIO_CONFIG_NAME=db-credentials -o json --no-pager | grep -q . && break
    sleep 0.5; i=$((i+1)); done
# Only the fields checked: under Debian's 6.1 kernel another field's value split the line.
echo "JOURNAL=$(journalctl -q -u tapio-node TAPIO_CONFIG_NAME=db-credentials -o json --no-pager \
    --output-fields=TAPIO_FILE,TAPIO_PROCESS_COMM | head -n 1)"
systemctl reload tapio-node; echo "RELOAD=$?"
# Past WatchdogSec=30: a loop that stopped pinging would be restarted.
sleep 40
echo "ACTIVE2=$(state)"
echo "MAINPID2=$(systemctl show -P MainPID tapio-node)"
echo "NRESTARTS=$(systemctl show -P NRestarts tapio-node)"
echo "STATUS=$(systemctl show -P StatusText tapio-node)"
echo "MEMORY=$(systemctl show -P MemoryCurrent tapio-node)"
echo "SECURITY=$(systemd-analyze security tapio-node.service 2>&1 | tail -n 1)"
systemctl stop tapio-node; echo "STOP=$?"
echo "RESULT=$(systemctl show -P Result tapio-node)"
echo "EXITSTATUS=$(systemctl show -P ExecMainStatus tapio-node)"
# The access store, written under the unit's sandbox (StateDirectory=).
echo "STATEMODE=$(stat -c %a /var/lib/tapio-node)"
echo "REPORT=$(tapio-node report readers --object default/db-credentials --since 1h --format json | tr -d '\n')"
journalctl -q -u tapio-node --no-pager -o short | sed 's/^/LOG: /'
echo DONE
systemctl poweroff
"""

PROBE_UNIT = """[Unit]
Description=tapio-node install test probe
After=tapio-node.service
[Service]
Type=oneshot
TimeoutStartSec=300
ExecStart=/usr/local/sbin/tapio-probe {vol}
[Install]
WantedBy=multi-user.target
"""


def check_nspawn(root, timeout_s=300):
    """Boot the root with systemd and run the unit as installed."""
    if shutil.which("systemd-nspawn") is None:
        raise Failure("cannot boot the root: systemd-nspawn not installed (apt-get install systemd-container)")
    pod_uid = str(uuid.uuid4())
    vol = f"/var/lib/kubelet/pods/{pod_uid}/volumes/kubernetes.io~secret/db-credentials"
    Path(root, vol.lstrip("/")).mkdir(parents=True)
    Path(root, vol.lstrip("/"), "password").write_text("s3cret")
    Path(root, "var/log/pods", f"default_db-0_{pod_uid}").mkdir(parents=True)
    probe = Path(root, "usr/local/sbin/tapio-probe")
    probe.write_text(PROBE)
    probe.chmod(0o755)
    Path(root, "etc/systemd/system/tapio-probe.service").write_text(PROBE_UNIT.format(vol=vol))
    Path(root, "etc/systemd/system/multi-user.target.wants/tapio-probe.service").symlink_to(
        "/etc/systemd/system/tapio-probe.service")
    Path(root, "etc/hostname").write_text("tapio-deb-test\n")
    Path(root, "tapio-probe.out").unlink(missing_ok=True)
    # A private mount namespace holding a bpffs instance of our own for the
    # container's /sys/fs/bpf; nspawn adds CAP_BPF/CAP_PERFMON and lets
    # bpf()/perf_event_open() through its own seccomp filter. --keep-unit
    # --register=no: no host systemd/machined needed.
    script = ('D=$(mktemp -d); mount -t bpf bpf "$D"; exec systemd-nspawn -q -D "$1" -b '
              '--register=no --keep-unit --capability=CAP_BPF,CAP_PERFMON,CAP_SYS_RESOURCE '
              '"--system-call-filter=bpf perf_event_open" --bind="$D":/sys/fs/bpf '
              '--bind-ro=/sys/kernel/tracing --bind-ro=/sys/kernel/btf')
    argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-ec", script, "sh", str(root)]
    log("booting the root with systemd-nspawn -b (about a minute: the probe waits out WatchdogSec)")
    boot = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        console, _ = boot.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        boot.kill()  # by pid: the nspawn process; the container dies with it
        console, _ = boot.communicate()
    out_file = Path(root, "tapio-probe.out")
    out = out_file.read_text() if out_file.exists() else ""
    if "DONE" not in out:
        raise Failure(f"the probe in the booted container did not finish:\n{out}\n"
                      f"--- console (tail):\n{console[-3000:]}")
    res = dict(line.split("=", 1) for line in out.split("\n") if "=" in line and line[:1].isupper()
               and not line.startswith("LOG:"))
    log("service log in the container:\n" + "\n".join(
        "    " + ln[5:] for ln in out.splitlines() if ln.startswith("LOG: ")))
    expect(res.get("ACTIVE") == "active", f"nspawn: tapio-node.service active (Type=notify) [{res.get('ACTIVE')}]")
    journal = json.loads(res.get("JOURNAL") or "{}")
    expect(journal.get("TAPIO_FILE") == "password" and journal.get("TAPIO_PROCESS_COMM") == "cat",
           "nspawn: journalctl -u tapio-node TAPIO_CONFIG_NAME=db-credentials shows the read by cat")
    expect(res.get("RELOAD") == "0" and res.get("MAINPID1") == res.get("MAINPID2"),
           f"nspawn: systemctl reload keeps main pid {res.get('MAINPID1')}")
    expect(res.get("ACTIVE2") == "active" and res.get("NRESTARTS") == "0",
           f"nspawn: still active after WatchdogSec, NRestarts={res.get('NRESTARTS')}")
    log(f"nspawn: status text: {res.get('STATUS')}; MemoryCurrent={res.get('MEMORY')}")
    check_exposure("nspawn: systemd-analyze security (booted)", res.get("SECURITY"))
    expect(res.get("STATEMODE") == "700", f"nspawn: StateDirectory= made /var/lib/tapio-node 0700 [{res.get('STATEMODE')}]")
    readers = json.loads(res.get("REPORT") or "{}").get("readers") or [{}]
    expect(any(r.get("command") == "cat" and r.get("kind") == "host" for r in readers[0].get("readers", [])),
           "nspawn: tapio-node report readers names the host's cat reading db-credentials (the store was written)")
    expect(res.get("STOP") == "0" and res.get("RESULT") == "success",
           f"nspawn: systemctl stop is clean (Result={res.get('RESULT')}, exit {res.get('EXITSTATUS')})")
    Path(root, "etc/systemd/system/multi-user.target.wants/tapio-probe.service").unlink()


def remove_and_purge(root):
    # An admin's edit must survive remove (dpkg keeps modified conffiles).
    conf = Path(root, CONFFILE.lstrip("/"))
    edit = "# local edit by test_deb\n"
    conf.write_text(conf.read_text() + edit)
    chroot(root, ["apt-get", "remove", "-y", "-q", "tapio-node"])
    expect(dpkg_status(root) == "rc", "after remove: dpkg state rc (config-files)")
    expect(conf.is_file() and conf.read_text().endswith(edit),
           f"after remove: {CONFFILE} kept, with the admin's edit")
    expect(not Path(root, UNIT.lstrip("/")).exists(), f"after remove: {UNIT} gone")
    expect(not Path(root, "usr/bin/tapio-node").exists(), "after remove: /usr/bin/tapio-node gone")
    left = listing(root, VENV)
    expect(left == [], f"after remove: nothing under {VENV} ({left[:5]})")
    expect(Path(root, "var/lib/tapio-node/access.db").is_file(),
           "after remove: the access store /var/lib/tapio-node/access.db kept")
    owned = chroot(root, ["dpkg", "-L", "tapio-node"], check=False).stdout.split()
    expect([f for f in owned if f.startswith("/") and not f.startswith("/etc")] == [],
           f"after remove: dpkg -L lists only /etc ({owned})")

    chroot(root, ["apt-get", "purge", "-y", "-q", "tapio-node"])
    expect(dpkg_status(root) in ("un", "not-known"), "after purge: package unknown to dpkg")
    expect(chroot(root, ["dpkg", "-L", "tapio-node"], check=False).returncode != 0,
           "after purge: dpkg -L has nothing")
    expect(not Path(root, "etc/tapio-node").exists(), "after purge: /etc/tapio-node gone")
    expect(not Path(root, "var/lib/tapio-node").exists(), "after purge: /var/lib/tapio-node gone")
    expect(not os.path.lexists(Path(root, WANTS.lstrip("/"))), "after purge: enablement link gone")
    expect(listing(root, VENV) == [], f"after purge: nothing under {VENV}")


def run_all():
    t_start = time.monotonic()
    ensure_tools()
    deb = build_deb()
    log(f"package: {deb.relative_to(TOP) if deb.is_relative_to(TOP) else deb} "
        f"({deb.stat().st_size / 1024:.0f} KiB)")
    lintian(deb)
    tarball = base_root_tarball()
    WORKDIR.mkdir(parents=True, exist_ok=True)
    root = tempfile.mkdtemp(prefix="tapio-deb-root-", dir=WORKDIR)
    try:
        t0 = time.monotonic()
        run(["tar", "-C", root, "--numeric-owner", "-xf", str(tarball)])
        log(f"unpacked the base root in {time.monotonic() - t0:.0f} s")
        install(root, deb, apt_cache_tarball(deb, tarball) if OFFLINE else None)
        check_cli(root)
        check_daemon(root)
        check_unit(root)
        reinstall(root, deb)
        check_nspawn(root)
        remove_and_purge(root)
    finally:
        remove_tree(root)
    log(f"all checks passed in {time.monotonic() - t_start:.0f} s")


TOOLS = ("debootstrap", "lintian", "dpkg-buildpackage", "dh_virtualenv", "systemd-nspawn",
         "unshare", "nsenter")


def _preconditions():
    """Why this test cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (debootstrap, chroot, mount namespaces, BPF)"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "needs kernel BTF (/sys/kernel/btf/vmlinux)"
    return None


def ensure_tools():
    """Install the build and test tools (as CI on a fresh machine needs)."""
    if all(shutil.which(t) for t in TOOLS):
        return
    log("installing build and test tools: make -C packaging build-deps")
    run(["make", "-C", str(TOP / "packaging"), "build-deps"], stdout=None, stderr=None)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise Failure(f"still missing after make -C packaging build-deps: {', '.join(missing)}")


try:
    import pytest
except ImportError:  # run as a script with the system Python
    pytest = None

if pytest is not None:
    @pytest.mark.slow
    @pytest.mark.kernel
    @pytest.mark.skipif(not ENABLED, reason="builds and installs the .deb in a debootstrap root "
                        "(minutes); set TAPIO_TEST_DEB=1 or CI=true")
    def test_deb_installs_runs_and_purges():
        why = _preconditions()
        if why:
            pytest.skip(why)
        run_all()


if __name__ == "__main__":
    why = _preconditions()
    if why:
        sys.exit(f"test_deb: cannot run: {why}")
    try:
        if sys.argv[1:] == ["--prepare"]:
            # Tools and the base root, made ahead where the checkout is
            # writable: a matrix VM sees this tree read-only.
            ensure_tools()
            apt_cache_tarball(build_deb(), base_root_tarball())
        else:
            run_all()
    except Failure as e:
        sys.exit(f"test_deb: FAILED: {e}")
