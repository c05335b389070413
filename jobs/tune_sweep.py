"""A Ray Tune + Optuna sweep as a Ray job (resumable: rerun the same command to continue).

    ray job submit --working-dir . -- python jobs/tune_sweep.py \
        --config configs/sweep_digits.yaml --run-dir /shared/runs/sweep

Takes the same arguments as `dedt-ray tune`: --config, --run-dir, key=value overrides.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package in --working-dir

from dedt_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]], prog="tune_sweep.py"))
