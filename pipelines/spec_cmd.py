"""`sphinx-x spec validate SPEC...` and `sphinx-x spec show SPEC`."""

from __future__ import annotations

import argparse
import sys

from cluster.spec import SpecError, dump_spec, load_spec


def command(args: argparse.Namespace) -> int:
    if args.spec_verb == "show":
        print(dump_spec(load_spec(args.spec)), end="")
        return 0
    status = 0
    for path in args.specs:
        try:
            load_spec(path)
        except SpecError as err:
            print(f"{err.file}: {err.field}: {err.reason}", file=sys.stderr)
            status = 2
        else:
            print(f"{path}: OK")
    return status
