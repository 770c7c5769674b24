"""The pinned Python environment of a cluster node: ``cluster/requirements.txt``, read once.

One file of exact pins serves three places, so they cannot drift apart:

- the container image (``Dockerfile`` runs ``docker/install.sh``, which installs this file);
- Ray Jobs on a cluster whose image lacks the dependencies (``cluster.dependencies:
  runtime_env``): each submission's ``runtime_env["pip"]`` is this list (:func:`job_pip`);
- the Ray version every rendered manifest declares (``rayVersion``) and the version check
  against a cluster's head (:func:`ray_version`).

    >>> ray_version()
    '2.60.0'
    >>> pinned("torch")
    'torch==2.13.0'
    >>> job_pip()["packages"][:2]
    ['torch==2.13.0', 'ray[default,train,data,serve]==2.60.0']
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

from models.errors import UserError

REQUIREMENTS = Path(__file__).with_name("requirements.txt")
_PIN_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==(?P<version>[^\s;]+)$")


@lru_cache(maxsize=None)
def requirements() -> tuple[str, ...]:
    """Every requirement line of :data:`REQUIREMENTS`, comments and blanks dropped, in file order.

    Each must be an exact pin (``name[extras]==version``): a range here would let two nodes
    (or the image and a job) resolve different versions.
    """
    try:
        text = REQUIREMENTS.read_text()
    except OSError as err:
        raise UserError(f"{REQUIREMENTS}: {err.strerror or err} (the pinned node environment)") from None
    lines = [ln.split("#", 1)[0].strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    loose = [ln for ln in lines if not _PIN_RE.match(ln)]
    if loose:
        raise UserError(f"{REQUIREMENTS}: every line must be an exact pin name==version, got {loose}")
    return tuple(lines)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned(name: str) -> str:
    """The requirement line of ``name`` (``"torch"`` -> ``"torch==2.13.0"``)."""
    for line in requirements():
        if _norm(_PIN_RE.match(line)["name"]) == _norm(name):
            return line
    raise UserError(f"{REQUIREMENTS}: no pin for {name!r}")


def pinned_version(name: str) -> str:
    return _PIN_RE.match(pinned(name))["version"]


def ray_version() -> str:
    """The Ray every node runs: the image's base and every manifest's ``rayVersion``."""
    return pinned_version("ray")


def job_pip() -> dict:
    """``runtime_env["pip"]`` for a Ray Job on a cluster without the image's dependencies.

    Ray builds one virtualenv per distinct list (cloned from the node's Ray environment, so
    the pinned ``ray`` is already there and only its extras' packages are added) and reuses it
    for every later job with the same list: the first job on a node pays the install. Unlike
    Ray's default (``--no-cache-dir``) pip keeps its cache, so a later list (a pin moved) only
    downloads what changed, and wheels built from source (DeepSpeed) are built once per node.
    """
    return {"packages": list(requirements()), "pip_check": False,
            "pip_install_options": ["--disable-pip-version-check"]}
