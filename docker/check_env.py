"""Check the Python environment docker/install.sh built (or is about to change).

    python docker/check_env.py                 # after installing: every pin holds, nothing conflicts
    python docker/check_env.py --plan R.json   # before installing: a `pip install --dry-run --report`
                                               # plan R.json moves no pin

What "holds" means:

- every line of ``cluster/requirements.txt`` is installed at exactly its version (a local label
  such as ``+cpu`` or ``+cu130`` is the build of that version, so ``torch 2.13.0+cpu`` holds
  ``torch==2.13.0``);
- the requirements of ``sphinx-x`` and, where installed, ``vllm`` are met by what is installed
  (``pip check`` restricted to them: the base image's own packages are not this project's to fix).

Exit 1 with one line per problem. Only the standard library and ``packaging`` (which pip and
every environment here carry).
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PINS = ROOT / "cluster" / "requirements.txt"
CHECKED = ("sphinx-x", "vllm")


def pins() -> dict[str, Version]:
    out = {}
    for line in PINS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            out[canonicalize_name(req.name)] = Version(spec.version)
    return out


def _public(version: str) -> Version:
    return Version(Version(version).public)


def installed() -> dict[str, str]:
    return {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}


def pin_problems(have: dict[str, str]) -> list[str]:
    problems = []
    for name, want in pins().items():
        got = have.get(name)
        if got is None:
            problems.append(f"{name}: pinned {want}, not installed")
        elif _public(got) != want:
            problems.append(f"{name}: pinned {want}, installed {got}")
    return problems


def requirement_problems(have: dict[str, str]) -> list[str]:
    problems = []
    for dist_name in CHECKED:
        try:
            dist = metadata.distribution(dist_name)
        except metadata.PackageNotFoundError:
            continue
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an extra's requirement, or another platform's
            got = have.get(canonicalize_name(req.name))
            if got is None:
                problems.append(f"{dist_name} requires {req}, not installed")
            elif not req.specifier.contains(_public(got), prereleases=True):
                problems.append(f"{dist_name} requires {req}, installed {got}")
    return problems


def plan_problems(report: Path) -> list[str]:
    """Packages a pip ``--report`` would install at a version other than their pin."""
    pinned = pins()
    problems = []
    for item in json.loads(report.read_text())["install"]:
        name = canonicalize_name(item["metadata"]["name"])
        version = item["metadata"]["version"]
        if name in pinned and _public(version) != pinned[name]:
            why = item.get("requested") and "requested" or "pulled in as a dependency"
            problems.append(f"{name}: pinned {pinned[name]}, the plan installs {version} ({why})")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", type=Path, help="a `pip install --dry-run --report` JSON file to check")
    args = parser.parse_args(argv)
    if args.plan:
        problems = plan_problems(args.plan)
        what = f"the plan {args.plan}"
    else:
        have = installed()
        problems = pin_problems(have) + requirement_problems(have)
        what = "the environment"
    for problem in problems:
        print(f"check_env: {problem}", file=sys.stderr)
    if problems:
        print(f"check_env: {what} breaks {PINS.relative_to(ROOT)} ({len(problems)} problem(s))", file=sys.stderr)
        return 1
    print(f"check_env: {what} keeps every pin of {PINS.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
