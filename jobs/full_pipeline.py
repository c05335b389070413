"""The whole pipeline as a Ray job.

    ray job submit --working-dir . -- python jobs/full_pipeline.py --config configs/default.yaml

Takes the same arguments as `dedt-ray run`: --config, --run-dir, --force, key=value overrides.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package in --working-dir

from dedt_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]], prog="full_pipeline.py"))
