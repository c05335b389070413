"""A study (`dedt-ray study`) as a Ray job (resumable: rerun the same command to continue).

    ray job submit --working-dir . -- python jobs/study.py \
        --config configs/study_digits.yaml --run-dir /shared/runs/study_digits

Takes the same arguments as `dedt-ray study`: --config, --run-dir, key=value overrides.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the package in --working-dir

from dedt_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]], prog="study.py"))
