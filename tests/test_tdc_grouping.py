"""TDC timestep grouping by SNR and per-group FLOPs budgets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from dedt_ray.tdc.budget import group_budgets, model_flops
from dedt_ray.tdc.grouping import (
    describe_groups,
    group_of,
    group_sizes,
    group_timesteps,
    snr_db,
    validate_groups,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _linear() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")


def _cosine() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def test_snr_db_matches_formula_and_falls_with_t() -> None:
    sched = _linear()
    abar = sched.alphas_cumprod.double().numpy()
    db = snr_db(sched)
    assert db.shape == (1000,) and db.dtype == np.float64
    np.testing.assert_allclose(db[[0, 500, 999]], 10 * np.log10(abar / (1 - abar))[[0, 500, 999]])
    assert db[0] == pytest.approx(40.0, abs=0.01)  # abar_0 = 1 - 1e-4
    assert np.all(np.diff(db) < 0)
    np.testing.assert_allclose(snr_db(DDIMScheduler(num_train_timesteps=1000)), db)


def test_quantile_groups_have_equal_counts_and_cover() -> None:
    groups = group_timesteps(_linear(), 4, "quantile")
    assert groups == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    assert group_sizes(group_timesteps(_linear(), 3, "quantile")) == [333, 334, 333]


@pytest.mark.parametrize("make", [_linear, _cosine])
def test_equal_snr_bins_have_equal_db_width(make) -> None:
    sched = make()
    db = snr_db(sched)
    groups = group_timesteps(sched, 4, "equal_snr")
    edges = np.linspace(db.max(), db.min(), 5)
    for i, (lo, hi) in enumerate(groups):
        assert db[lo] <= edges[i] + 1e-9 and db[hi - 1] >= edges[i + 1] - 1e-9
    # Under the cosine schedule equal-dB bins are very unbalanced.
    sizes = group_sizes(groups)
    assert sum(sizes) == 1000
    if make is _cosine:
        assert max(sizes) > 2 * min(sizes)


def test_equal_snr_empty_bin_is_a_clear_error() -> None:
    # The cosine schedule's last step drops ~30 dB at once: with many bins some hold nothing.
    with pytest.raises(ValueError, match=r"equal_snr bin \d+ .* holds no timestep"):
        group_timesteps(_cosine(), 40, "equal_snr")


def test_explicit_boundaries_in_timesteps_and_db() -> None:
    sched = _linear()
    assert group_timesteps(sched, 3, "explicit", [100, 600]) == [(0, 100), (100, 600), (600, 1000)]
    db = snr_db(sched)
    groups = group_timesteps(sched, 3, "explicit", [10.0, -10.0], boundary_unit="snr_db")
    (_, a), (_, b), _ = groups
    assert db[a - 1] >= 10.0 > db[a] and db[b - 1] >= -10.0 > db[b]


@pytest.mark.parametrize(
    ("boundaries", "unit", "message"),
    [
        ([600, 100], "timestep", "boundary 100 is not above the previous one 600"),
        ([100, 1000], "timestep", "boundary 1000 must be an integer"),
        ([100], "timestep", "needs 2 boundaries"),
        ([-10.0, 10.0], "snr_db", "SNR boundary 10.0 dB must be below"),
        ([10.0, 9.99999], "snr_db", "SNR boundary 9.99999 dB leaves an empty group"),
        ([100.0, 0.0], "snr_db", "SNR boundary 100.0 dB leaves an empty group"),
    ],
)
def test_explicit_validation_names_the_offending_value(boundaries, unit, message) -> None:
    with pytest.raises(ValueError, match=message):
        group_timesteps(_linear(), 3, "explicit", boundaries, boundary_unit=unit)


def test_validate_groups_errors() -> None:
    with pytest.raises(ValueError, match="group 1 starts at t=6"):
        validate_groups([(0, 5), (6, 10)], 10)
    with pytest.raises(ValueError, match=r"group 1 = \[5, 5\) is empty"):
        validate_groups([(0, 5), (5, 5), (5, 10)], 10)
    with pytest.raises(ValueError, match="must cover all 10"):
        validate_groups([(0, 5), (5, 9)], 10)
    with pytest.raises(ValueError, match="n_groups must be"):
        group_timesteps(_linear(), 0)


def test_group_of_and_describe() -> None:
    groups = [(0, 100), (100, 600), (600, 1000)]
    assert [group_of(t, groups) for t in (0, 99, 100, 599, 600, 999)] == [0, 0, 1, 1, 2, 2]
    np.testing.assert_array_equal(group_of(torch.tensor([5, 700, 100]), groups), [0, 2, 1])
    with pytest.raises(ValueError, match="timestep 1000 is outside"):
        group_of(1000, groups)
    rows = describe_groups(_linear(), groups)
    assert [r["size"] for r in rows] == [100, 500, 400]
    assert rows[0]["snr_db_max"] > rows[0]["snr_db_min"] > rows[1]["snr_db_max"]


def test_group_budgets_formula_and_order() -> None:
    # N = 4, k = 0.5: sizes (i/4 + (4-i)/4 * 0.5) F = 0.625, 0.75, 0.875, 1.0
    noisy_small = group_budgets(4, 0.5, 100.0)
    np.testing.assert_allclose(noisy_small, [100.0, 87.5, 75.0, 62.5])
    np.testing.assert_allclose(group_budgets(4, 0.5, 100.0, "cleanest"), noisy_small[::-1])
    np.testing.assert_allclose(group_budgets(3, 1.0, 7.0), [7.0] * 3)
    assert group_budgets(1, 0.3, 5.0) == [5.0]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="k .* must be in"):
            group_budgets(4, bad, 1.0)
    with pytest.raises(ValueError, match="smallest"):
        group_budgets(2, 0.5, 1.0, "middle")  # type: ignore[arg-type]


def test_model_flops_counts_convs_linears_and_attention(tiny_unet) -> None:
    model = tiny_unet(0)
    expected = 0

    def count(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
        nonlocal expected
        if isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            expected += 2 * out.numel() * module.in_channels * k
        elif isinstance(module, torch.nn.Linear):
            expected += 2 * out.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules()]
    with torch.no_grad():
        model(torch.zeros(1, 1, 8, 8), torch.ones(1, dtype=torch.long), torch.zeros(1).long())
    for h in hooks:
        h.remove()
    # Attention: QK^T and AV, each 2 * seq^2 * inner; 4 attentions at 4x4 (seq 16), inner 32.
    expected += 4 * 2 * (2 * 16 * 16 * 32)
    assert model_flops(model) == expected
    assert model_flops(model, sample_size=16) > 3 * expected
