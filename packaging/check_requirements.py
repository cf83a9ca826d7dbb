"""Fail if a runtime dependency in pyproject.toml is not pinned in
packaging/debian/requirements.txt (the venv of the .deb would then get
whatever pip resolves on the day of the build)."""
import re
import sys
import tomllib
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent


def norm(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def main():
    project = tomllib.loads((TOP / "pyproject.toml").read_text())["project"]
    wanted = {norm(re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0])
              for d in project.get("dependencies", [])}
    pinned = {}
    req = TOP / "packaging" / "debian" / "requirements.txt"
    for line in req.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):  # pip options
            name, _, version = line.partition("==")
            pinned[norm(name)] = version
    missing = sorted(wanted - pinned.keys())
    loose = sorted(n for n, v in pinned.items() if not v)
    if missing or loose:
        if missing:
            print(f"error: {req.relative_to(TOP)} lacks pins for pyproject.toml "
                  f"dependencies: {', '.join(missing)} (add NAME==VERSION lines)",
                  file=sys.stderr)
        if loose:
            print(f"error: {req.relative_to(TOP)}: not pinned with ==: "
                  f"{', '.join(loose)}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
