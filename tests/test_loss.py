"""Losses and the LR schedule: CriterionDSN, OHEM against a slow hand-written version, poly values."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from utils.logits import upsample_logits
from utils.loss import CriterionDSN, OhemCrossEntropy, cross_entropy, ohem_target
from utils.schedule import poly_lr, set_lr

IGNORE = 255


def slow_ohem_target(probs: np.ndarray, target: np.ndarray, thresh: float, min_kept: int, factor: int) -> np.ndarray:
    """The original OhemCrossEntropy2d's new target, written with loops: probs (N, C, H, W), target (N, H, W)."""
    n, c, h, w = probs.shape
    if factor > 1:  # scipy.ndimage.zoom(order=1) of the probs, (order=0) of the target, corners aligned
        out_h, out_w = round(h / factor), round(w / factor)
        small_probs = np.zeros((n, c, out_h, out_w))
        small_target = np.zeros((n, out_h, out_w), dtype=np.int64)
        for i in range(out_h):
            y = i * (h - 1) / (out_h - 1)
            y0 = int(math.floor(y))
            y1, fy = min(y0 + 1, h - 1), y - y0
            for j in range(out_w):
                x = j * (w - 1) / (out_w - 1)
                x0 = int(math.floor(x))
                x1, fx = min(x0 + 1, w - 1), x - x0
                small_probs[:, :, i, j] = ((1 - fy) * (1 - fx) * probs[:, :, y0, x0] + (1 - fy) * fx * probs[:, :, y0, x1]
                                           + fy * (1 - fx) * probs[:, :, y1, x0] + fy * fx * probs[:, :, y1, x1])
                small_target[:, i, j] = target[:, int(math.floor(y + 0.5)), int(math.floor(x + 0.5))]
        kept_min = min_kept // (factor * factor)
    else:
        small_probs, small_target, kept_min = probs, target, min_kept
    gt_probs = [small_probs[b, small_target[b, i, j], i, j]
                for b in range(n) for i in range(small_target.shape[1]) for j in range(small_target.shape[2])
                if small_target[b, i, j] != IGNORE]
    if kept_min >= len(gt_probs):
        threshold = 1.0
    else:
        threshold = thresh
        if kept_min > 0:
            threshold = max(threshold, sorted(gt_probs)[kept_min - 1])
    new_target = np.full_like(target, IGNORE)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                label = target[b, i, j]
                if label != IGNORE and probs[b, label, i, j] <= threshold:
                    new_target[b, i, j] = label
    return new_target


def make_example(seed: int = 0, shape=(2, 5, 40, 56)):
    """Confident logits; 80% of the pixels labelled with the arg-max (easy), the rest random; a band ignored."""
    generator = torch.Generator().manual_seed(seed)
    logits = 4.0 * torch.randn(shape, generator=generator)
    target = logits.argmax(1)
    hard = torch.rand(target.shape, generator=generator) < 0.2
    target[hard] = torch.randint(0, shape[1], target.shape, generator=generator)[hard]
    target[:, :3] = IGNORE
    return logits, target


@pytest.mark.parametrize("factor", [8, 1])
@pytest.mark.parametrize("min_kept", [0, 200, 3200, 100000])
def test_ohem_matches_slow_version(factor, min_kept):
    logits, target = make_example()
    probs = torch.softmax(logits, 1).numpy()
    expected = slow_ohem_target(probs, target.numpy(), 0.7, min_kept, factor)
    got = ohem_target(logits, target, thresh=0.7, min_kept=min_kept, factor=factor).numpy()
    np.testing.assert_array_equal(got, expected)


def test_ohem_example_exercises_every_branch():
    """The parameters above reach: threshold = thresh, threshold = k-th value > thresh, keep everything."""
    logits, target = make_example()
    valid = (target != IGNORE).sum().item()
    kept = {k: (ohem_target(logits, target, 0.7, k, factor=1) != IGNORE).sum().item() for k in (200, 3200, 100000)}
    assert kept[200] < kept[3200] < valid == kept[100000]
    assert kept[3200] >= 3200  # the k-th smallest is above 0.7: at least k pixels kept


def test_ohem_loss_is_mean_ce_over_kept_pixels():
    logits, target = make_example(seed=1)
    hard = ohem_target(logits, target, 0.7, 3200, factor=8)
    expected = F.cross_entropy(logits, hard, ignore_index=IGNORE)
    assert torch.allclose(OhemCrossEntropy(0.7, 3200, IGNORE, factor=8)(logits, target), expected)


def test_criterion_dsn_is_ce_main_plus_04_aux_on_upsampled_logits():
    generator = torch.Generator().manual_seed(0)
    main, aux = torch.randn(2, 19, 7, 9, generator=generator), torch.randn(2, 19, 7, 9, generator=generator)
    target = torch.randint(0, 19, (2, 50, 66), generator=generator)
    target[:, :5] = IGNORE
    expected = (F.cross_entropy(upsample_logits(main, (50, 66)), target, ignore_index=IGNORE)
                + 0.4 * F.cross_entropy(upsample_logits(aux, (50, 66)), target, ignore_index=IGNORE))
    assert torch.allclose(CriterionDSN()([main, aux], target), expected, atol=1e-6)


def test_criterion_with_ohem_differs_only_on_the_main_head():
    logits, target = make_example(seed=2, shape=(1, 19, 24, 24))
    plain, ohem = CriterionDSN(), CriterionDSN(ohem=True, ohem_keep=64 * 20)
    aux = torch.randn_like(logits)
    expected_main = OhemCrossEntropy(0.7, 64 * 20)(logits, target)
    assert torch.allclose(ohem([logits, aux], target) - plain([logits, aux], target),
                          expected_main - cross_entropy(logits, target), atol=1e-6)


def test_all_ignored_gives_zero_not_nan():
    logits = torch.randn(1, 19, 4, 4, requires_grad=True)
    target = torch.full((1, 16, 16), IGNORE)
    for criterion in (CriterionDSN(), CriterionDSN(ohem=True)):
        loss = criterion([logits, logits], target)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(logits.grad).all()


def test_poly_schedule_values():
    assert poly_lr(0.01, 0, 60000) == 0.01
    assert poly_lr(0.01, 30000, 60000, 0.9) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_lr(0.01, 59999, 60000, 0.9) == pytest.approx(0.01 * (1 / 60000) ** 0.9)
    assert poly_lr(0.01, 60000, 60000) == 0.0
    values = [poly_lr(1.0, it, 10) for it in range(11)]
    assert all(a > b for a, b in zip(values, values[1:]))
    with pytest.raises(ValueError, match="iteration"):
        poly_lr(0.01, 60001, 60000)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    set_lr(optimizer, 0.25)
    assert optimizer.param_groups[0]["lr"] == 0.25


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_ohem_on_gpu_matches_cpu():
    logits, target = make_example()
    for factor in (8, 1):
        expected = ohem_target(logits, target, 0.7, 3200, factor=factor)
        got = ohem_target(logits.cuda(), target.cuda(), 0.7, 3200, factor=factor).cpu()
        assert (got != expected).float().mean() < 1e-3  # float rounding may flip pixels at the threshold
