"""The data-efficiency study's compute rule, speed-up, table and plot (no Ray, a second)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import data_efficiency as study  # noqa: E402


def _result(rows: int, flops: float, fd: float, extra: float = 0.0) -> dict:
    steps = study.epoch_steps(rows, 20, 64)
    return {"rows": rows, "steps": steps, "images_seen": steps * 64, "train_flops": flops,
            "reweight_flops": extra, "reweight_images": 64 if extra else 0,
            "total_flops": flops + extra, "metric": "FD_digits-cnn", "fd": fd,
            "precision": 0.9, "recall": 0.5, "wall_s": 10.0}  # fmt: skip


def test_epoch_rule() -> None:
    assert study.epoch_steps(1797, 20, 64) == 562  # ceil(20 * 1797 / 64)
    assert study.epoch_steps(180, 20, 64) == 57
    assert study.epoch_steps(10, 20, 64) == study.MIN_STEPS


def test_speedups_table_plot(tmp_path: Path) -> None:
    specs = [
        study.Spec("full-seed0", "full", result=_result(1797, 100.0, 2.0)),
        study.Spec("full-seed1", "full", seed=1, result=_result(1797, 100.0, 2.1)),
        study.Spec("gaussian-0.5", "subset", "gaussian", 0.5, result=_result(899, 50.0, 2.09)),
        study.Spec("random-0.1", "subset", "random", 0.1, result=_result(180, 10.0, 4.0)),
        study.Spec(
            "gaussian-0.5-dro", "dro", "gaussian", 0.5, result=_result(899, 50.0, 2.0, extra=12.5)
        ),  # fmt: skip
        study.Spec("full-57steps", "truncated", steps=57, result=_result(1797, 10.0, 3.0)),
    ]
    fd, sp = study.speedups(specs)
    assert fd == 2.0
    assert sp["gaussian-0.5"] == pytest.approx(2.0)
    assert sp["gaussian-0.5-dro"] == pytest.approx(100 / 62.5)  # reference + proxy count
    assert sp["random-0.1"] is None and sp["full-seed1"] is None
    md = study.table(specs)
    assert "**2.00x**" in md and "FD_digits-cnn <= 2.100" in md
    study.plot(specs, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 1000
