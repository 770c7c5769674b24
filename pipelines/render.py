"""`sphinx-x render SPEC --to kuberay|launcher|serve [-o DIR]`: the stages' plans, rendered by
:mod:`cluster.render` (which sees stages only as data: entry points, demands, services)."""

from __future__ import annotations

import argparse
import sys

from cluster.render import SPEC_IN_POD, image_warning, render, write
from cluster.spec import load_spec
from pipelines.stages import plans


def command(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    if spec.storage.endpoint_url == "embedded" and args.to != "serve":
        print("warning: storage.endpoint_url is 'embedded' (a server on 127.0.0.1 of one machine); "
              "a real cluster needs an S3 endpoint every node can reach", file=sys.stderr)
    warning = image_warning(spec) if args.to != "serve" else None
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    for path in write(render(spec, args.to, plans(spec, SPEC_IN_POD)), args.output):
        print(path)
    return 0
