"""`dedt-ray <stage>|run --config FILE --run-dir DIR [--force] [dotted.key=value ...]`.

Exit codes: 0 done, 1 a stage failed, 2 invalid config or arguments (before any Ray work).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from dedt_ray.config import Config, ConfigError, load_config

log = logging.getLogger("dedt_ray")


def _stage_names() -> list[str]:
    from dedt_ray.pipeline import STAGES

    return list(STAGES)


def build_parser(prog: str = "dedt-ray") -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        help="YAML config file (default: the run directory's config.yaml, else built-in defaults)",
    )
    common.add_argument(
        "--run-dir", help="run directory, local path or s3:// / gs:// URI (default: runs/<config>)"
    )
    common.add_argument("--force", action="store_true", help="redo stages even if up to date")
    common.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    sub.add_parser("run", parents=[common], help="run every enabled stage in DAG order")
    sub.add_parser("tune", parents=[common], help="Ray Tune + Optuna sweep (docs/tune.md)")
    sub.add_parser("study", parents=[common], help="time to quality over settings x seeds")
    for name in _stage_names():
        sub.add_parser(name, parents=[common], help=f"run the {name} stage")
    add_sample_parser(sub)
    return parser


def add_sample_parser(sub: Any) -> None:
    """The `sample` subcommand."""
    p = sub.add_parser("sample", help="generate images from a trained model")
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


def sample_main(args: argparse.Namespace) -> int:
    """`dedt-ray sample`: images from an exported model -> grid.png + samples.npz."""
    from dedt_ray.diffusion.sample import read_info, sample_images, sample_labels, write_samples
    from dedt_ray.store import RunStore

    if args.num < 1 or args.steps < 1 or args.batch_size < 1:
        print("error: --num, --steps and --batch-size must be >= 1")
        return 2
    run_dir = args.run_dir or default_run_dir(args.config)
    model = args.model or RunStore(run_dir).path("train", "model")
    info = read_info(model)
    if info is None:
        print(f"error: {model} is not an exported model (no unet/); train first")
        return 2
    try:
        labels = sample_labels(args.num, args.classes, info)
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    out = args.out or os.path.join(os.path.dirname(model.rstrip("/")), "samples")
    if "://" in out:
        print("error: --out must be a local folder")
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


def check_inputs(cfg: Config) -> None:
    """Cheap checks of local input paths, so a typo fails before any cluster work."""
    path = cfg.data.path
    if path and "://" not in path and not Path(path).exists():
        raise ConfigError(f"data.path: {path} does not exist")
    from dedt_ray.reweight.checks import check_reweight

    check_reweight(cfg)  # reference.pretrained is a diffusers UNet folder; batch sizes


def main(argv: list[str] | None = None, prog: str = "dedt-ray") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="dedt-ray | %(message)s", stream=sys.stderr)
    if args.command == "sample":
        return sample_main(args)
    try:
        cfg = load_config(base_config(args.config, args.run_dir), args.overrides)
        check_inputs(cfg)
        if args.command == "study":
            from dedt_ray.study import resolve_settings

            resolve_settings(cfg)  # every setting's keys, before any trial starts
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.command == "tune":
        from dedt_ray.tune import main as tune_main

        return tune_main(cfg, args.run_dir or default_run_dir(args.config))
    if args.command == "study":
        from dedt_ray.study import main as study_main

        return study_main(cfg, args.run_dir or default_run_dir(args.config))
    from dedt_ray.pipeline import run_pipeline
    from dedt_ray.store import RunStore

    store = RunStore(args.run_dir or default_run_dir(args.config))
    only = None if args.command == "run" else [args.command]
    try:
        results = run_pipeline(cfg, store, force=args.force, only=only)
    except Exception as exc:
        log.error("failed: %s: %s", type(exc).__name__, exc)
        raise
    print(f"\nrun directory: {store.uri(store.root)}")
    for name, manifest in results.items():
        state = "up to date, skipped" if manifest.get("skipped_stage") else "done"
        seconds = manifest.get("seconds", 0.0)
        print(f"  {name:<10} {state:<20} {manifest.get('summary', '')} [{seconds:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
