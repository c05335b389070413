"""`dedt-ray <stage>|run --config FILE --run-dir DIR [--force] [dotted.key=value ...]`.

Exit codes: 0 done, 1 a stage failed, 2 invalid config or arguments (before any Ray work),
130 interrupted (Ctrl-C; rerun the same command to resume).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from dedt_ray.config import Config, ConfigError, dump_config, load_config

log = logging.getLogger("dedt_ray")
RESUME_HINT = (
    "interrupted; rerun the same command to resume (finished stages are skipped, training "
    "continues from its last checkpoint)"
)


def _stage_names() -> list[str]:
    from dedt_ray.pipeline import STAGES

    return list(STAGES)


def package_version() -> str:
    try:
        return version("dedt-ray")
    except PackageNotFoundError:  # a source tree without installed metadata
        return "unknown"


def verbosity_parser(default: Any) -> argparse.ArgumentParser:
    """-v / -q, accepted before and after the command (`default=SUPPRESS` after it, so a
    sub-command does not reset what was given before it)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "-v", "--verbose", action="count", default=default,
        help="more output: library logs, Ray worker output, tracebacks",
    )  # fmt: skip
    p.add_argument(
        "-q", "--quiet", action="count", default=default, help="warnings and errors only"
    )
    return p


def build_parser(prog: str = "dedt-ray") -> argparse.ArgumentParser:
    quiet = verbosity_parser(argparse.SUPPRESS)
    common = argparse.ArgumentParser(add_help=False, parents=[quiet])
    common.add_argument(
        "--config",
        help="YAML config file (default: the run directory's config.yaml, else built-in defaults)",
    )
    common.add_argument(
        "--run-dir", help="run directory, local path or s3:// / gs:// URI (default: runs/<config>)"
    )
    common.add_argument(
        "--force",
        action="store_true",
        help="redo stages even if up to date, discarding their in-progress training state",
    )
    common.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.splitlines()[0], parents=[verbosity_parser(0)]
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    sub.add_parser("run", parents=[common], help="run every enabled stage in DAG order")
    sub.add_parser("tune", parents=[common], help="Ray Tune + Optuna sweep (docs/tune.md)")
    sub.add_parser(
        "config", parents=[common], help="print the resolved config (file + overrides) and exit"
    )
    sub.add_parser("study", parents=[common], help="time to quality over settings x seeds")
    for name in _stage_names():
        sub.add_parser(name, parents=[common], help=f"run the {name} stage")
    from dedt_ray.evaluate import fid_cli

    add_sample_parser(sub, quiet)
    fid_cli.add_parser(sub)
    return parser


def add_sample_parser(sub: Any, quiet: argparse.ArgumentParser) -> None:
    """The `sample` subcommand."""
    p = sub.add_parser("sample", parents=[quiet], help="generate images from a trained model")
    p.add_argument("--model", help="exported model folder (default: <run-dir>/train/model)")
    p.add_argument("--run-dir", help="run directory whose train/model to use")
    p.add_argument("--config", help="config file (only to find the default run directory)")
    p.add_argument("--num", type=int, default=100, help="number of images (default 100)")
    p.add_argument("--classes", help="comma-separated class indices or names (default: all)")
    p.add_argument("--scheduler", choices=["ddpm", "ddim"], default="ddpm")
    p.add_argument("--steps", type=int, default=100, help="sampling steps (default 100)")
    p.add_argument("--guidance-scale", type=float, default=1.0, help="CFG scale (1: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--out", help="output folder (default: <model>/../samples)")


def default_run_dir(config: str | None) -> str:
    return str(Path("runs") / (Path(config).stem if config else "default"))


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (pytest swaps it per test)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        """Ignored (logging's setStream): the stream is always the current sys.stderr."""


def setup_logging(verbose: int, quiet: int) -> None:
    """dedt-ray's log lines at INFO (-v: DEBUG plus library chatter, -q: WARNING) on stderr."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    log.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("dedt-ray | %(message)s"))
        log.addHandler(handler)
    if not verbose:  # read by diffusers / transformers on import, here and in Ray workers
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)


def sample_main(args: argparse.Namespace) -> int:
    """`dedt-ray sample`: images from an exported model -> grid.png + samples.npz."""
    from dedt_ray.diffusion.sample import read_info, sample_images, sample_labels, write_samples
    from dedt_ray.store import RunStore

    if args.num < 1 or args.steps < 1 or args.batch_size < 1:
        error("--num, --steps and --batch-size must be >= 1")
        return 2
    run_dir = args.run_dir or default_run_dir(args.config)
    model = args.model or RunStore(run_dir).path("train", "model")
    info = read_info(model)
    if info is None:
        error(f"{model} is not an exported model (no unet/); train first")
        return 2
    try:
        labels = sample_labels(args.num, args.classes, info)
    except ValueError as exc:
        error(str(exc))
        return 2
    out = args.out or os.path.join(os.path.dirname(model.rstrip("/")), "samples")
    if "://" in out:
        error("--out must be a local folder")
        return 2
    images = sample_images(
        model, labels, args.num, args.batch_size, args.scheduler, args.steps,
        args.guidance_scale, args.seed,
    )  # fmt: skip
    write_samples(images, labels, out)
    print(f"{len(images)} samples -> {out}/grid.png, {out}/samples.npz")
    return 0


def base_config(config: str | None, run_dir: str | None) -> str | None:
    """--config, else the config.yaml an earlier command wrote into a local --run-dir."""
    if config is None and run_dir and "://" not in run_dir:
        saved = Path(run_dir) / "config.yaml"
        if saved.is_file():
            return str(saved)
    return config


def resolve(args: argparse.Namespace) -> tuple[Config, str]:
    """(config, run directory): --config, else the run directory's saved config.yaml."""
    run_dir = args.run_dir or default_run_dir(args.config)
    source = base_config(args.config, run_dir)
    if source != args.config:
        log.debug("using the run directory's %s", source)
    return load_config(source, args.overrides), run_dir


def run_main(args: argparse.Namespace, cfg: Config, run_dir: str) -> int:
    """A stage command or `run`: check inputs, run what is out of date, print the summary."""
    from dedt_ray.pipeline import pending_stages, run_pipeline
    from dedt_ray.preflight import check_inputs, check_weights, open_run_dir

    check_inputs(cfg, [])  # data.path, reference.pretrained, batch sizes
    store = open_run_dir(run_dir)
    only = None if args.command == "run" else [args.command]
    check_weights(cfg, pending_stages(cfg, store, args.force, only))
    results = run_pipeline(cfg, store, force=args.force, only=only)
    print(f"\nrun directory: {store.uri(store.root)}")
    for name, manifest in results.items():
        state = "up to date, skipped" if manifest.get("skipped_stage") else "done"
        seconds = manifest.get("seconds", 0.0)
        print(f"  {name:<10} {state:<20} {manifest.get('summary', '')} [{seconds:.1f} s]")
    return 0


def one_line(exc: BaseException) -> str:
    """The exception as one readable line: for Ray's wrapped errors, the innermost
    `SomeError: message` line of the remote traceback."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    named = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b.*:", ln)]
    if named:
        return named[-1]
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def dispatch(args: argparse.Namespace) -> int:
    if args.command == "sample":
        return sample_main(args)
    if args.command == "fid":
        from dedt_ray.evaluate.fid_cli import main as fid_main

        return fid_main(args)
    cfg, run_dir = resolve(args)
    if args.command == "config":
        print(dump_config(cfg), end="")
        return 0
    if args.command == "tune":
        from dedt_ray.preflight import check_inputs
        from dedt_ray.tune import main as tune_main

        check_inputs(cfg, ["embed"])
        return tune_main(cfg, run_dir)
    if args.command == "study":
        from dedt_ray.preflight import check_inputs
        from dedt_ray.study import main as study_main
        from dedt_ray.study import resolve_settings

        check_inputs(cfg, ["embed"])
        resolve_settings(cfg)  # every setting's keys, before any trial starts
        return study_main(cfg, run_dir)
    return run_main(args, cfg, run_dir)


def main(argv: list[str] | None = None, prog: str = "dedt-ray") -> int:
    args = build_parser(prog).parse_args(argv)
    verbose, quiet = getattr(args, "verbose", 0) or 0, getattr(args, "quiet", 0) or 0
    setup_logging(verbose, quiet)
    try:
        return dispatch(args)
    except ConfigError as exc:
        error(str(exc))
        return 2
    except KeyboardInterrupt:
        print(f"\n{RESUME_HINT}", file=sys.stderr)
        return 130
    except Exception as exc:  # a stage failed: one line, the traceback with -v
        if verbose:
            traceback.print_exc()
        stage = getattr(exc, "dedt_stage", None)
        hint = "" if verbose else " (-v shows the traceback)"
        error(f"{stage + ' stage: ' if stage else ''}{one_line(exc)}{hint}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
