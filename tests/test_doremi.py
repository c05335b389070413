"""DoReMi Group DRO: the update rule by hand, GroupDRO's bookkeeping, DDP split, state."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dedt_ray.reweight import GroupDRO, doremi_update


def _hand_update(alpha: list[float], excess: list[float], eta: float, c: float) -> list[float]:
    z = [a * math.exp(eta * e) for a, e in zip(alpha, excess, strict=True)]
    return [(1 - c) * v / sum(z) + c / len(alpha) for v in z]


def test_doremi_update_hand_computed_k2() -> None:
    # alpha = (1/2, 1/2), excess = (1, 0), eta = 1, c = 0.1:
    # softmax = (e, 1) / (e + 1); then 0.9 * that + 0.05
    e = math.exp(1.0)
    expected = [0.9 * e / (e + 1) + 0.05, 0.9 / (e + 1) + 0.05]
    out = doremi_update(np.array([0.5, 0.5]), np.array([1.0, 0.0]), eta=1.0, smoothing=0.1)
    np.testing.assert_allclose(out, expected, rtol=1e-12)
    assert expected[0] == pytest.approx(0.7079527, abs=1e-6)


def test_doremi_update_hand_computed_k3_numpy_and_torch() -> None:
    alpha, excess, eta, c = [0.2, 0.3, 0.5], [0.4, 0.0, -0.2], 2.0, 1e-3
    expected = _hand_update(alpha, excess, eta, c)
    out_np = doremi_update(np.array(alpha), np.array(excess), eta, c)
    assert isinstance(out_np, np.ndarray) and out_np.dtype == np.float64
    np.testing.assert_allclose(out_np, expected, rtol=1e-12)

    out_t = doremi_update(
        torch.tensor(alpha, dtype=torch.float64), torch.tensor(excess, dtype=torch.float64), eta, c
    )
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float64
    np.testing.assert_allclose(out_t.numpy(), expected, rtol=1e-12)

    out32 = doremi_update(torch.tensor(alpha), torch.tensor(excess), eta, c)
    assert out32.dtype == torch.float32
    out_np32 = doremi_update(np.array(alpha, dtype=np.float32), np.array(excess), eta, c)
    assert out_np32.dtype == np.float32
    np.testing.assert_allclose(out_np32, expected, rtol=1e-6)


def test_doremi_update_smoothing_bounds() -> None:
    rng = np.random.default_rng(0)
    k, c = 7, 0.05
    alpha = np.full(k, 1 / k)
    for _ in range(50):
        alpha = doremi_update(alpha, rng.normal(0, 20, k), eta=3.0, smoothing=c)
        assert alpha.sum() == pytest.approx(1.0, abs=1e-12)
        assert (alpha >= c / k - 1e-15).all()
    # a huge excess on one class drives the others down to exactly the floor
    out = doremi_update(np.full(3, 1 / 3), np.array([1e3, 0.0, 0.0]), 1.0, 0.3)
    np.testing.assert_allclose(out, [0.8, 0.1, 0.1], rtol=1e-12)


@pytest.mark.parametrize(("eta", "smoothing"), [(0.0, 0.1), (-1.0, 0.1), (1.0, -0.1), (1.0, 1.0)])
def test_doremi_update_bad_hparams(eta: float, smoothing: float) -> None:
    with pytest.raises(ValueError):
        doremi_update(np.full(2, 0.5), np.zeros(2), eta, smoothing)


def test_doremi_update_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="same length"):
        doremi_update(np.full(2, 0.5), np.zeros(3), 1.0, 0.0)


def test_groupdro_first_step_and_average() -> None:
    dro = GroupDRO(3, eta=1.0, smoothing=0.01)
    loss_proxy = torch.tensor([1.0, 3.0, 0.5, 2.0])
    loss_ref = torch.tensor([0.5, 1.0, 1.0, 2.0])
    labels = torch.tensor([0, 0, 1, 2])
    # class 0: mean(0.5, 2.0) = 1.25; class 1: max(-0.5, 0) = 0; class 2: 0
    dro.step(loss_proxy, loss_ref, labels)
    np.testing.assert_allclose(dro.excess.numpy(), [1.25, 0.0, 0.0])
    expected = _hand_update([1 / 3] * 3, [1.25, 0.0, 0.0], 1.0, 0.01)
    np.testing.assert_allclose(dro.weights.numpy(), expected, rtol=1e-12)
    assert dro.num_updates == 1
    np.testing.assert_allclose(dro.average.numpy(), (np.full(3, 1 / 3) + expected) / 2)

    w1 = dro.weights.clone()
    dro.step(loss_proxy, loss_ref, labels)
    np.testing.assert_allclose(
        dro.average.numpy(), (np.full(3, 1 / 3) + w1.numpy() + dro.weights.numpy()) / 3
    )


def test_groupdro_absent_class_keeps_excess() -> None:
    dro = GroupDRO(3, eta=0.5, smoothing=0.0)
    dro.step(torch.tensor([2.0, 1.0]), torch.tensor([0.0, 0.0]), torch.tensor([0, 2]))
    np.testing.assert_allclose(dro.excess.numpy(), [2.0, 0.0, 1.0])
    w_before = dro.weights.numpy().tolist()
    dro.step(torch.tensor([4.0]), torch.tensor([1.0]), torch.tensor([1]))
    np.testing.assert_allclose(dro.excess.numpy(), [2.0, 3.0, 1.0])
    np.testing.assert_allclose(
        dro.weights.numpy(), _hand_update(w_before, [2.0, 3.0, 1.0], 0.5, 0.0), rtol=1e-12
    )


def test_groupdro_loss_uses_updated_weights_and_gradients() -> None:
    dro = GroupDRO(2, eta=2.0, smoothing=0.0)
    loss_proxy = torch.tensor([1.0, 2.0, 4.0], requires_grad=True)
    loss_ref = torch.tensor([0.0, 2.0, 4.0], requires_grad=True)
    labels = torch.tensor([0, 1, 1])
    loss = dro.step(loss_proxy, loss_ref, labels)
    w = _hand_update([0.5, 0.5], [1.0, 0.0], 2.0, 0.0)
    denom = w[0] + 2 * w[1]
    assert loss.ndim == 0
    assert loss.item() == pytest.approx((w[0] * 1 + w[1] * 2 + w[1] * 4) / denom, rel=1e-6)
    # the uniform (pre-update) weights would give 7/3, so this fails if the order is wrong
    assert loss.item() != pytest.approx(7 / 3, rel=1e-3)
    loss.backward()
    np.testing.assert_allclose(
        loss_proxy.grad.numpy(), [w[0] / denom, w[1] / denom, w[1] / denom], rtol=1e-6
    )
    assert loss_ref.grad is None
    assert not dro.weights.requires_grad and not dro.excess.requires_grad


def test_groupdro_ddp_split_matches_single_step() -> None:
    gen = torch.Generator().manual_seed(0)
    k = 5
    single, split = GroupDRO(k, eta=1.5), GroupDRO(k, eta=1.5)
    for _ in range(4):
        loss_proxy = torch.rand(16, generator=gen) * 2
        loss_ref = torch.rand(16, generator=gen)
        labels = torch.randint(0, k, (16,), generator=gen)
        single.step(loss_proxy, loss_ref, labels)
        s0, c0 = split.class_sums(loss_proxy[:9], loss_ref[:9], labels[:9])
        s1, c1 = split.class_sums(loss_proxy[9:], loss_ref[9:], labels[9:])
        split.update_from_sums(s0 + s1, c0 + c1)  # what an all-reduce (sum) gives
    for name in ("weights", "average", "excess"):
        np.testing.assert_allclose(getattr(split, name), getattr(single, name), rtol=1e-12)
    assert not torch.allclose(single.weights, torch.full((k,), 1 / k, dtype=torch.float64))


def test_groupdro_state_dict_round_trip(tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    dro = GroupDRO(4, eta=1.0, smoothing=1e-3)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        dro.step(
            torch.rand(8, generator=gen),
            torch.rand(8, generator=gen) * 0.5,
            torch.randint(0, 4, (8,), generator=gen),
        )
    path = tmp_path / "dro.safetensors"
    save_file(dro.state_dict(), str(path))
    restored = GroupDRO(4, eta=1.0, smoothing=1e-3)
    restored.load_state_dict(load_file(str(path)))
    assert restored.num_updates == 3 and isinstance(restored.num_updates, int)
    for name in ("weights", "average", "excess"):
        np.testing.assert_array_equal(getattr(restored, name), getattr(dro, name))
    # both continue identically
    batch = (torch.tensor([1.0, 0.2]), torch.tensor([0.0, 0.0]), torch.tensor([3, 1]))
    assert restored.step(*batch).item() == dro.step(*batch).item()
    np.testing.assert_array_equal(restored.average, dro.average)

    with pytest.raises(ValueError, match="shape"):
        GroupDRO(5).load_state_dict(dro.state_dict())
    with pytest.raises(KeyError):
        GroupDRO(4).load_state_dict({"weights": dro.weights})


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_classes": 0},
        {"num_classes": 2.0},
        {"num_classes": 2, "eta": 0.0},
        {"num_classes": 2, "smoothing": 1.0},
        {"num_classes": 2, "smoothing": -0.1},
    ],
)
def test_groupdro_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        GroupDRO(**kwargs)


def test_groupdro_bad_inputs() -> None:
    dro = GroupDRO(3)
    ok = torch.zeros(4)
    with pytest.raises(ValueError, match="same shape"):
        dro.step(ok, torch.zeros(3), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="labels shape"):
        dro.step(ok, ok, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="integer"):
        dro.step(ok, ok, torch.zeros(4))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        dro.step(ok, ok, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="shape"):
        dro.update_from_sums(torch.zeros(2), torch.zeros(3))
    assert dro.num_updates == 0
