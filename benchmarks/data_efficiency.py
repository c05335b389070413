"""The data-efficiency study on the digits: now `dedt-ray study` (docs/study.md); this runs it.

    python benchmarks/data_efficiency.py [--config configs/study_digits.yaml]
                                         [--run-dir runs/study_digits] [key=value ...]

is `dedt-ray study --config configs/study_digits.yaml --run-dir runs/study_digits ...`:
settings x seeds as Ray Tune trials, quality curves against training compute, the compute to
reach the full-data baseline's quality and the speed-up with a bootstrap interval
(`<run>/study/summary.json`, `curves.parquet`, `curves.png`, the report's "Study" section).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dedt_ray.cli import main as cli_main  # noqa: E402

DEFAULTS = {"--config": "configs/study_digits.yaml", "--run-dir": "runs/study_digits"}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    for flag, value in DEFAULTS.items():
        if flag not in args:
            args = [flag, value, *args]
    return cli_main(["study", *args], prog="data_efficiency.py")


if __name__ == "__main__":
    sys.exit(main())
