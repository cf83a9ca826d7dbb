"""The kernel matrix: Debian's kernels by package name, fetched and unpacked
into a cache git ignores, never touching the machine's apt configuration.

`python -m tests.vm.kernels [VERSION...]` fetches; `tests/vm/matrix.py`
boots them.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CACHE = os.environ.get("TAPIO_VM_CACHE", os.path.join(REPO_ROOT, ".cache", "kernels"))
APT_SOURCES = ("/etc/apt/sources.list.d/debian.sources", "/etc/apt/sources.list")
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str          # what KERNELS= takes
    release: str       # uname -r
    debian: str        # the Debian release that ships it
    suites: tuple[str, ...]
    packages: tuple[str, ...]


MATRIX = (
    Kernel("5.10", "5.10.0-32-amd64", "Debian 11 (bullseye)",
           ("bullseye", "bullseye-security"), ("linux-image-5.10.0-32-amd64",)),
    Kernel("6.1", "6.1.0-57-amd64", "Debian 12 (bookworm)",
           ("bookworm", "bookworm-updates", "bookworm-security"), ("linux-image-6.1.0-57-amd64",)),
    Kernel("6.12", "6.12.117+deb13-amd64", "Debian 13 (trixie)",
           ("trixie", "trixie-security"), ("linux-image-6.12.117+deb13-amd64",)),
    # forky's linux-image-* is a meta package; the image and modules are split.
    Kernel("7.2", "7.2.12+deb14-amd64", "Debian 14 (forky)",
           ("forky",), ("linux-binary-7.2.12+deb14-amd64", "linux-modules-7.2.12+deb14-amd64")),
)
BY_NAME = {k.name: k for k in MATRIX}


class FetchError(RuntimeError):
    pass


def select(names: str | None) -> list[Kernel]:
    """Kernels named in a KERNELS= string (space or comma separated)."""
    if not names or names.strip() == "all":
        return list(MATRIX)
    out = []
    for name in re.split(r"[\s,]+", names.strip()):
        if name not in BY_NAME:
            raise FetchError(f"unknown kernel {name!r}: choose from {', '.join(BY_NAME)}")
        out.append(BY_NAME[name])
    return out


def mirrors() -> tuple[str, str]:
    """The Debian archive and security URIs this machine's apt already uses."""
    main = security = None
    for path in APT_SOURCES:
        try:
            text = open(path).read()
        except OSError:
            continue
        for uri in re.findall(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+)", text, re.M):
            if uri.rstrip("/").endswith("-security"):
                security = security or uri
            elif "debian" in uri:
                main = main or uri
    if not main:
        raise FetchError("no Debian archive found in " + " or ".join(APT_SOURCES))
    return main, security or main.rstrip("/") + "-security"


def kernel_dir(k: Kernel) -> str:
    return os.path.join(CACHE, k.release)


def image_path(k: Kernel) -> str:
    return os.path.join(kernel_dir(k), "boot", f"vmlinuz-{k.release}")


def modules_path(k: Kernel) -> str:
    return os.path.join(kernel_dir(k), "lib", "modules", k.release)


def _apt(state: str, *args: str) -> None:
    opts = ["-o", f"Dir::Etc::sourcelist={state}/sources.list", "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={state}/lists", "-o", f"Dir::Cache={state}/cache",
            "-o", "APT::Get::List-Cleanup=0", "-o", "Debug::NoLocking=1", "-q"]
    run = subprocess.run(["apt-get", *opts, *args], cwd=state, capture_output=True, text=True)
    if run.returncode:
        raise FetchError(f"apt-get {' '.join(args)} failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}")


def fetch(k: Kernel, log=print) -> None:
    """Download and unpack one kernel unless the cache has it."""
    if os.path.exists(image_path(k)) and os.path.isdir(modules_path(k)):
        return
    main, security = mirrors()
    state = os.path.join(CACHE, "apt", k.name)
    os.makedirs(os.path.join(state, "lists", "partial"), exist_ok=True)
    os.makedirs(os.path.join(state, "cache", "archives", "partial"), exist_ok=True)
    with open(os.path.join(state, "sources.list"), "w") as f:
        for suite in k.suites:
            uri = security if suite.endswith("-security") else main
            f.write(f"deb [signed-by={KEYRING}] {uri} {suite} main\n")
    log(f"{k.name}: apt-get update ({' '.join(k.suites)})")
    _apt(state, "update")
    for old in glob.glob(os.path.join(state, "*.deb")):
        os.unlink(old)
    log(f"{k.name}: apt-get download {' '.join(k.packages)}")
    _apt(state, "download", *k.packages)
    tmp = kernel_dir(k) + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for deb in sorted(glob.glob(os.path.join(state, "*.deb"))):
        subprocess.run(["dpkg-deb", "-x", deb, tmp], check=True)
        os.unlink(deb)
    # Debian 14 ships the image under /usr/lib/modules and /boot may be absent.
    for sub in ("lib/modules",):
        usr = os.path.join(tmp, "usr", sub)
        if os.path.isdir(usr) and not os.path.isdir(os.path.join(tmp, sub)):
            os.makedirs(os.path.dirname(os.path.join(tmp, sub)), exist_ok=True)
            shutil.move(usr, os.path.join(tmp, sub))
    if not os.path.exists(os.path.join(tmp, "boot", f"vmlinuz-{k.release}")):
        found = glob.glob(os.path.join(tmp, "**", "vmlinuz*"), recursive=True)
        if not found:
            raise FetchError(f"{k.name}: no vmlinuz in {' '.join(k.packages)}")
        os.makedirs(os.path.join(tmp, "boot"), exist_ok=True)
        shutil.move(found[0], os.path.join(tmp, "boot", f"vmlinuz-{k.release}"))
    subprocess.run(["depmod", "-b", tmp, k.release], check=True)
    shutil.rmtree(kernel_dir(k), ignore_errors=True)
    os.rename(tmp, kernel_dir(k))
    log(f"{k.name}: unpacked into {os.path.relpath(kernel_dir(k), REPO_ROOT)}")


def main(argv: list[str]) -> int:
    try:
        for k in select(" ".join(argv) or os.environ.get("KERNELS")):
            fetch(k)
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
