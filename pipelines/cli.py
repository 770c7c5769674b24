"""`sphinx-x`: the command line (a contract: tests and users rely on these names; docs/architecture.md).

Every verb is declared here and dispatched lazily to ``command(args) -> int`` in the module
that owns it, so `sphinx-x --help` is instant and a verb never imports another's stack. The
stage verbs (preprocess, train, serve, ...) come from the stage registry (``pipelines.stages``):
each stage declares its own arguments and runs through :func:`pipelines.stage.command`.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from pathlib import Path

from pipelines import stages as registry

# verbs that start Ray and run for minutes: their library logs go to a file (cluster.logs)
LONG_VERBS = ("demo", "run", *registry.names())


def _stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in stages if s not in registry.names()]
    if bad or not stages:
        raise argparse.ArgumentTypeError(f"stages must be a comma list of {','.join(registry.names())}; got {text!r}")
    return stages


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sphinx-x", description="Prepare data for, train and serve SPHINX-X models on Ray.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, target: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(target=target)
        return sp

    d = verb("demo", "pipelines.demo.demo", "the main job on the embedded default, end to end")
    d.add_argument("--run-dir", default=None, help="where the report, PNGs and logs go (default: runs/demo-TIMESTAMP)")
    d.add_argument("--keep-serving", action="store_true", help="leave the endpoint up after the report")
    d.add_argument("--quick", action="store_true", help="smaller data and fewer steps (CI)")
    d.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    d.add_argument("--samples", type=int, nargs=2, default=None, metavar=("TRAIN", "HELDOUT"),
                   help="override how many training and held-out samples are drawn (a quicker smoke run)")
    d.add_argument("--seed", type=int, default=None,
                   help="seed of the synthetic data (held-out split included), batch order and initial weights (default 0)")

    r = verb("run", "pipelines.run", "run the spec's stages in order, locally or as Ray Jobs")
    r.add_argument("spec")
    r.add_argument("--stages", type=_stages, default=registry.names(), help="comma list (default: all)")
    r.add_argument("--address", default=None, help="Ray Jobs address http://HEAD:8265 (default: the spec's)")
    r.add_argument("--force", action="store_true", help="re-run stages whose outputs are complete")
    r.add_argument("--detach", action="store_true", help="leave the serve stage running and return")

    for stage in registry.STAGES:
        sp = verb(stage.name, "pipelines.stage", stage.help)
        sp.set_defaults(stage=stage.name)
        stage.add_arguments(sp)  # first: a stage's own positionals come before SPEC (`curate som SPEC`)
        # a stage with a one-off form (`eval --data ...`) builds its spec from its flags when none is given
        sp.add_argument("spec", nargs="?" if stage.spec_optional else None)
        if not stage.service:  # a deploy always replaces the app
            sp.add_argument("--force", action="store_true", help="ignore complete outputs and redo the stage")

    rd = verb("render", "pipelines.render", "render KubeRay / cluster-launcher / Serve YAML from the spec")
    rd.add_argument("spec")
    rd.add_argument("--to", required=True, choices=["kuberay", "launcher", "serve"])  # cluster.render.TARGETS
    rd.add_argument("-o", "--output", default=None, help="directory to write into (default: stdout)")

    s = verb("spec", "pipelines.spec_cmd", "spec utilities")
    s_sub = s.add_subparsers(dest="spec_verb", required=True)
    sv = s_sub.add_parser("validate", help="validate spec files; exit 2 naming the offending field")
    sv.add_argument("specs", nargs="+")
    ss = s_sub.add_parser("show", help="print the spec with all defaults filled in")
    ss.add_argument("spec")

    t = verb("tiles", "pipelines.tiles", "show how an image is tiled (kept and skipped sub-images)")
    t.add_argument("image")
    t.add_argument("--flavour", default="debug")
    t.add_argument("--json", action="store_true")
    t.add_argument("--png", default=None, metavar="OUT", help="draw canvas, kept and skipped tiles")

    i = verb("info", "pipelines.info", "parameter counts (meta device) and token budget of a flavour")
    i.add_argument("--flavour", default="debug")
    i.add_argument("--json", action="store_true")
    i.add_argument("--weights", default=None, metavar="DIR",
                   help="check a model directory instead: parts, dtypes, parameter counts, tokenizer, keys")

    cv = verb("convert", "pipelines.convert", "published weights (LLaMA2-Accessory SPHINX releases) -> a model directory")
    cv.add_argument("src", help="the release directory (consolidated.NN-of-MM.model.pth, tokenizer.model, ...)")
    cv.add_argument("--from", dest="source_format", required=True, choices=["accessory"])
    cv.add_argument("-o", "--output", required=True, metavar="OUT", help="the model directory to write")
    cv.add_argument("--flavour", default=None, help="base flavour (default: by llama_type, sphinx-tiny[-1k])")
    cv.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="written dtype (default: the checkpoint's)")
    cv.add_argument("--json", action="store_true")

    verb("up", "cluster.runtime", "start a local Ray head + embedded S3 in the background").add_argument(
        "--spec", default=None, help="spec whose storage to serve (default: the embedded default)")
    verb("down", "cluster.runtime", "stop what `sphinx-x up` started")
    verb("status", "cluster.runtime", "show what `sphinx-x up` started and whether it is alive")

    j = verb("jobs", "cluster.jobs", "Ray Jobs on a cluster: list, status, logs, stop")
    j.add_argument("action", choices=["list", "status", "logs", "stop"])
    j.add_argument("job_id", nargs="?")
    j.add_argument("--address", default=None, help="http://HEAD:8265 (default: $RAY_ADDRESS or the spec's)")
    j.add_argument("--spec", default=None)
    j.add_argument("--follow", action="store_true", help="with logs: stream until the job ends")
    return p


def main(argv: list[str] | None = None) -> int:
    from cluster.logs import terminal

    args = build_parser().parse_args(argv)
    # the console script (argv None) owns the process: its stderr goes to the log file; called
    # with argv (tests, other programs) it leaves the caller's streams and logging alone
    if args.verb in LONG_VERBS and argv is None:
        # Ray's, Ray Train's and DeepSpeed's own lines go to the run's log file; ours, the live
        # progress lines, warnings and errors reach the terminal (cluster.logs)
        from cluster.logs import setup

        path = setup(f"{args.verb}-{Path(getattr(args, 'spec', None) or args.verb).stem}", verbose=args.verbose)
        print(f"[sphinx-x] log file: {path}", file=terminal(), flush=True)
    else:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            datefmt="%H:%M:%S",
        )
    from cluster.logs import log_file
    from cluster.spec import SpecError
    from models.errors import UserError

    owns_processes = args.verb in LONG_VERBS and argv is None
    if owns_processes:
        from cluster.reaper import adopt_orphans

        signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops a long verb as Ctrl-C does: cleanups run
        adopt_orphans()  # orphans of its Ray (a vLLM engine whose replica died) stay its to stop

    try:
        if getattr(args, "stage", None):
            from pipelines.stage import command

            return int(command(registry.get(args.stage), args) or 0)
        module = importlib.import_module(args.target)
        return int(module.command(args) or 0)
    except SpecError as err:
        print(f"spec error: {err}", file=terminal())
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=terminal())
        return 130
    except UserError as err:
        print(f"error: {err}", file=terminal())
        return 1
    except Exception as err:  # a bug or a library failure: one line here, the traceback in the log
        if log_file() is None:
            raise
        logging.getLogger("pipelines.cli").debug("unexpected error", exc_info=True)
        import traceback

        traceback.print_exc()  # fd 2: the log file
        print(f"error: {type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}\n"
              f"  (full traceback in {log_file()})", file=terminal())
        return 1
    finally:
        if owns_processes:  # no process of this command outlives it (cluster.reaper)
            from cluster.reaper import reap

            reap()


def _interrupt(*_) -> None:
    raise KeyboardInterrupt()


if __name__ == "__main__":
    sys.exit(main())
