"""`dedt-ray <stage>|run --config FILE --run-dir DIR [--force] [dotted.key=value ...]`.

Exit codes: 0 done, 1 a stage failed, 2 invalid config or arguments (before any Ray work).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

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
    for name in _stage_names():
        sub.add_parser(name, parents=[common], help=f"run the {name} stage")
    from dedt_ray.diffusion.sample import add_sample_parser
    from dedt_ray.evaluate import fid_cli

    add_sample_parser(sub)
    fid_cli.add_parser(sub)
    return parser


def default_run_dir(config: str | None) -> str:
    return str(Path("runs") / (Path(config).stem if config else "default"))


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
        from dedt_ray.diffusion.sample import main as sample_main

        return sample_main(args)
    if args.command == "fid":
        from dedt_ray.evaluate.fid_cli import main as fid_main

        return fid_main(args)
    try:
        cfg = load_config(base_config(args.config, args.run_dir), args.overrides)
        check_inputs(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.command == "tune":
        from dedt_ray.tune import main as tune_main

        return tune_main(cfg, args.run_dir or default_run_dir(args.config))
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
