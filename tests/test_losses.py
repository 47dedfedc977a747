"""Tests of libra.losses: balanced L1, LGR-L1, LGR-CE, bucketed class re-weighting, basics."""
import math

import pytest
import torch
import torch.nn.functional as F

from libra.losses import (
    BalancedL1Loss,
    BCRSigmoidCrossEntropyLoss,
    CrossEntropyLoss,
    L1Loss,
    LGRCrossEntropyLoss,
    LGRL1Loss,
    SmoothL1Loss,
    balanced_l1_loss,
    bcr_sigmoid_cross_entropy,
    binary_cross_entropy_with_logits,
    bucketed_class_weights,
    cross_entropy,
    l1_loss,
    lgr_ce_sample_weight,
    lgr_cross_entropy,
    lgr_l1_loss,
    smooth_l1_loss,
    weighted_sum,
)


def _grad_of(loss_fn, x_values, **kwargs):
    """d loss / d pred at pred = x_values, target = 0 (float64)."""
    pred = torch.tensor(x_values, dtype=torch.float64, requires_grad=True)
    loss_fn(pred, torch.zeros_like(pred), **kwargs).sum().backward()
    return pred.grad


def _eq8_gradient(x, alpha=0.5, gamma=1.5, beta=1.0):
    """Closed-form Eq. 8 for x >= 0, in plain Python."""
    b = math.exp(gamma / alpha) - 1
    return alpha * math.log(b * x / beta + 1) if x < beta else gamma


# ----------------------------------------------------------------------------- balanced L1


def test_balanced_l1_spec_check_values():
    pred = torch.tensor([0.1, 1.0], dtype=torch.float64, requires_grad=True)
    loss = balanced_l1_loss(pred, torch.zeros_like(pred))
    assert loss[0].item() == pytest.approx(0.031353, abs=1e-6)
    assert loss[1].item() == pytest.approx(1.078594, abs=1e-6)
    loss.sum().backward()
    assert pred.grad[0].item() == pytest.approx(0.5338, abs=1e-4)


def test_balanced_l1_gradient_at_one_and_zero():
    grads = _grad_of(balanced_l1_loss, [1.0 - 1e-6, 1.0 + 1e-6, 0.0])
    assert grads[0].item() == pytest.approx(1.5, abs=1e-4)
    assert grads[1].item() == pytest.approx(1.5, abs=1e-12)
    assert grads[2].item() == 0.0


@pytest.mark.parametrize("alpha,gamma,beta", [(0.5, 1.5, 1.0), (0.3, 1.0, 1.0), (0.5, 1.5, 0.11), (1.0, 2.0, 2.5)])
def test_balanced_l1_is_continuous_at_beta(alpha, gamma, beta):
    x = torch.tensor([beta - 1e-9, beta, beta + 1e-9], dtype=torch.float64)
    loss = balanced_l1_loss(x, torch.zeros_like(x), alpha, gamma, beta)
    assert torch.allclose(loss, loss[1].expand(3), atol=1e-7)


def test_balanced_l1_gradient_is_eq8_on_a_grid():
    values = [i / 50 for i in range(1, 150)]  # 0.02 .. 2.98, both branches
    grads = _grad_of(balanced_l1_loss, values)
    expected = torch.tensor([_eq8_gradient(x) for x in values], dtype=torch.float64)
    assert torch.allclose(grads, expected, atol=1e-10)
    # the sign follows pred - target
    grads_negative = _grad_of(balanced_l1_loss, [-x for x in values])
    assert torch.allclose(grads_negative, -expected, atol=1e-10)


def test_balanced_l1_symmetric_and_is_difference_based():
    pred = torch.tensor([[0.3, -0.2, 2.0, 0.0]])
    target = torch.tensor([[0.1, 0.1, -1.0, 0.0]])
    assert torch.allclose(balanced_l1_loss(pred, target), balanced_l1_loss(target, pred))
    assert torch.allclose(balanced_l1_loss(pred, target), balanced_l1_loss(pred - target, torch.zeros_like(pred)))


def test_balanced_l1_beta_011_runs():
    x = torch.linspace(-1, 1, 101, dtype=torch.float64, requires_grad=True)
    loss = balanced_l1_loss(x, torch.zeros_like(x), beta=0.11)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(x.grad).all()
    assert loss.min().item() >= 0.0
    # the formula as written: for beta != 1 the gradient at 0+ is alpha / beta - alpha, not 0
    assert _grad_of(balanced_l1_loss, [1e-12], beta=0.11).item() == pytest.approx(0.5 / 0.11 - 0.5, rel=1e-6)
    # outliers have the constant gradient gamma
    assert torch.allclose(x.grad[x.detach().abs() > 0.11].abs(), torch.tensor(1.5, dtype=torch.float64))


def test_balanced_l1_module_reduction():
    torch.manual_seed(0)
    pred, target = torch.randn(6, 4), torch.randn(6, 4)
    weight = torch.rand(6, 4)
    elementwise = balanced_l1_loss(pred, target)
    module = BalancedL1Loss(loss_weight=2.0)
    assert torch.allclose(module(pred, target), 2.0 * elementwise.mean())
    assert torch.allclose(module(pred, target, weight, 3.0), 2.0 * (elementwise * weight).sum() / 3.0)
    assert torch.allclose(module(pred, target, weight, torch.tensor(3.0)), 2.0 * (elementwise * weight).sum() / 3.0)
    per_roi = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    assert torch.allclose(module(pred, target, per_roi, 5), 2.0 * (elementwise * per_roi[:, None]).sum() / 5)


def test_balanced_l1_bad_input():
    with pytest.raises(ValueError, match="beta"):
        BalancedL1Loss(beta=0.0)
    with pytest.raises(ValueError, match="beta"):
        balanced_l1_loss(torch.zeros(2, 4), torch.zeros(2, 4), beta=-1.0)
    with pytest.raises(ValueError, match="shape"):
        balanced_l1_loss(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="weight"):
        BalancedL1Loss()(torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(4))


def test_empty_batch_gives_zero_not_nan():
    pred = torch.zeros(0, 4, requires_grad=True)
    for module in (BalancedL1Loss(), LGRL1Loss(), SmoothL1Loss(), L1Loss()):
        assert module(pred, torch.zeros(0, 4), torch.zeros(0, 4), torch.tensor(0.0)).item() == 0.0
        assert module(pred, torch.zeros(0, 4)).item() == 0.0
    logits = torch.zeros(0, 5, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.int64)
    for module in (CrossEntropyLoss(), LGRCrossEntropyLoss()):
        assert module(logits, labels, None, 0).item() == 0.0


# ----------------------------------------------------------------------------- LGR-L1


@pytest.mark.parametrize("alpha,gamma", [(0.5, 1.5), (0.3, 1.2)])
def test_lgr_l1_gradient_equals_balanced_l1_gradient(alpha, gamma):
    values = [i / 40 for i in range(-120, 121) if i != 0]  # -3 .. 3 without 0
    lgr = _grad_of(lgr_l1_loss, values, alpha=alpha, gamma=gamma)
    balanced = _grad_of(balanced_l1_loss, values, alpha=alpha, gamma=gamma)
    # equal up to the 1e-6 added to G_s: the relative difference is 1e-6 / G_s
    assert torch.allclose(lgr, balanced, rtol=1e-4, atol=0)
    grad_smooth_l1 = torch.tensor([min(abs(x), 1.0) for x in values], dtype=torch.float64)
    assert torch.allclose(lgr, balanced * grad_smooth_l1 / (grad_smooth_l1 + 1e-6), rtol=1e-12, atol=1e-14)
    assert _grad_of(lgr_l1_loss, [0.0]).item() == 0.0


def test_lgr_l1_value_is_rho_times_smooth_l1():
    alpha, gamma = 0.5, 1.5
    b = math.exp(gamma / alpha) - 1
    values = [0.05, 0.4, 0.99, 1.0, 1.7, 4.0]
    loss = lgr_l1_loss(torch.tensor(values, dtype=torch.float64), torch.zeros(len(values), dtype=torch.float64))
    for x, got in zip(values, loss.tolist()):
        if x < 1:
            expected = alpha * math.log(b * x + 1) / (x + 1e-6) * 0.5 * x * x
        else:
            expected = gamma / (1 + 1e-6) * (x - 0.5)
        assert got == pytest.approx(expected, rel=1e-12)


def test_lgr_l1_module_reduction():
    torch.manual_seed(1)
    pred, target, weight = torch.randn(5, 4), torch.randn(5, 4), torch.rand(5, 4)
    elementwise = lgr_l1_loss(pred, target)
    assert torch.allclose(LGRL1Loss(loss_weight=0.5)(pred, target, weight, 2.0), 0.5 * (elementwise * weight).sum() / 2)
    with pytest.raises(ValueError, match="beta"):
        LGRL1Loss(beta=0)


# ----------------------------------------------------------------------------- LGR-CE


def test_lgr_ce_weight_range():
    alpha, gamma = 0.8, 1.0
    b = math.exp(gamma / alpha) - 1
    hardest = lgr_ce_sample_weight(torch.tensor(1.0, dtype=torch.float64), alpha, gamma)
    assert hardest.item() == pytest.approx(gamma, rel=1e-5)  # alpha * ln(b + 1) = gamma
    easy = lgr_ce_sample_weight(torch.tensor(1e-3, dtype=torch.float64), alpha, gamma)
    assert easy.item() == pytest.approx(alpha * b, rel=5e-3)  # q -> 0: alpha * b (about 1.99)
    assert alpha * b == pytest.approx(1.9923, abs=1e-3)
    q = torch.linspace(1e-3, 1, 200, dtype=torch.float64)
    rho = lgr_ce_sample_weight(q, alpha, gamma)
    assert (rho[1:] < rho[:-1]).all()  # easier samples get larger weights
    assert lgr_ce_sample_weight(torch.tensor(1.0), 0.5, 1.5).item() == pytest.approx(1.5, rel=1e-5)


def test_lgr_ce_gradient_is_weighted_ce_gradient():
    torch.manual_seed(2)
    alpha, gamma = 0.8, 1.0
    b = math.exp(gamma / alpha) - 1
    logits = (3 * torch.randn(7, 5, dtype=torch.float64)).requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 3, 4, 4, 2])
    weight = torch.rand(7, dtype=torch.float64)
    lgr_cross_entropy(logits, labels, weight, 4.0, alpha, gamma).backward()

    # independent reference: grad_z = rho * weight * (softmax(z) - onehot) / avg_factor
    expected = torch.zeros(7, 5, dtype=torch.float64)
    for n in range(7):
        z = logits[n].tolist()
        exps = [math.exp(v - max(z)) for v in z]
        probs = [e / sum(exps) for e in exps]
        label = int(labels[n])
        q = 1 - probs[label]
        rho = alpha * math.log(b * q + 1) / (q + 1e-6)
        for c in range(5):
            expected[n, c] = rho * weight[n].item() * (probs[c] - float(c == label)) / 4.0
    assert torch.allclose(logits.grad, expected, atol=1e-10)


def test_lgr_ce_value_and_module():
    torch.manual_seed(3)
    logits = torch.randn(6, 4)
    labels = torch.tensor([0, 1, 2, 3, 3, 0])
    ce = F.cross_entropy(logits, labels, reduction="none")
    q = 1 - torch.softmax(logits, 1)[torch.arange(6), labels]
    rho = lgr_ce_sample_weight(q)
    assert torch.allclose(LGRCrossEntropyLoss()(logits, labels), (rho * ce).mean())
    assert torch.allclose(LGRCrossEntropyLoss(loss_weight=2.0)(logits, labels, None, 3), 2 * (rho * ce).sum() / 3)
    # easy samples are up-weighted: LGR-CE >= CE for every sample
    assert (rho >= 1.0 - 1e-6).all()
    with pytest.raises(ValueError, match="labels"):
        lgr_cross_entropy(logits, labels[:5])
    with pytest.raises(ValueError, match="weight"):
        lgr_cross_entropy(logits, labels, torch.ones(6, 1))


# ----------------------------------------------------------------------------- BCR


def _bcr_weights_reference(counts, num_buckets=10, a=0.5, t=0.025):
    logs = [math.log(max(c, 1)) for c in counts]
    low, high = min(logs), max(logs)
    width = (high - low) / num_buckets
    weights = []
    for value in logs:
        bucket = min(int(math.floor((value - low) / width)), num_buckets - 1)
        weights.append(1 / (1 + math.exp(-(bucket / (num_buckets - 1) - a) / t)))
    return weights


def test_bcr_weights_match_reference():
    counts = [1, 3, 10, 40, 100, 400, 1000, 5000, 10000, 12, 700]
    weights = bucketed_class_weights(torch.tensor(counts))
    assert weights.shape == (len(counts),) and weights.dtype == torch.float32
    expected = torch.tensor(_bcr_weights_reference(counts), dtype=torch.float32)
    assert torch.allclose(weights, expected, rtol=1e-6, atol=1e-12)
    # monotone in the frequency, ~0 for the rarest, ~1 for the most frequent
    order = sorted(range(len(counts)), key=lambda i: counts[i])
    sorted_weights = weights[order]
    assert (sorted_weights[1:] >= sorted_weights[:-1]).all()
    assert weights[0].item() < 1e-6 and weights[8].item() > 1 - 1e-6
    # other S / a / t
    assert torch.allclose(
        bucketed_class_weights(torch.tensor(counts), num_buckets=5, a=0.3, t=0.1),
        torch.tensor(_bcr_weights_reference(counts, 5, 0.3, 0.1), dtype=torch.float32),
    )


def test_bcr_weights_edge_cases():
    # zero counts are clamped to 1: same weight as a class seen once
    weights = bucketed_class_weights(torch.tensor([0, 1, 1000]))
    assert torch.isfinite(weights).all() and weights[0] == weights[1]
    # all classes equally frequent: nothing to balance, weights ~1
    assert (bucketed_class_weights(torch.tensor([7, 7, 7])) > 0.999).all()
    with pytest.raises(ValueError, match=">= 0"):
        bucketed_class_weights(torch.tensor([-1, 3]))
    with pytest.raises(ValueError, match="num_buckets"):
        bucketed_class_weights(torch.tensor([1, 3]), num_buckets=1)
    with pytest.raises(ValueError, match="1-D"):
        bucketed_class_weights(torch.ones(2, 2))


def test_bcr_sigmoid_cross_entropy_hand_computed():
    class_weights = torch.tensor([0.1, 0.5, 0.9])  # C = 3, background column 3
    logits = torch.tensor([[0.2, -1.0, 0.5, 1.5], [2.0, 0.3, -0.7, -0.1]])
    labels = torch.tensor([1, 3])  # class 1, background

    def bce(z, y):
        p = 1 / (1 + math.exp(-z))
        return -(y * math.log(p) + (1 - y) * math.log(1 - p))

    def sample_loss(z, label):
        total = 0.0
        for i, zi in enumerate(z):
            w = 1.0 if i in (3, label) else class_weights[i].item()
            total += w * bce(zi, 1.0 if i == label else 0.0)
        return total

    losses = [sample_loss(logits[n].tolist(), labels[n].item()) for n in range(2)]
    got = bcr_sigmoid_cross_entropy(logits, labels, class_weights)
    assert got.item() == pytest.approx(sum(losses) / 2, rel=1e-6)
    weight = torch.tensor([0.5, 2.0])
    got = bcr_sigmoid_cross_entropy(logits, labels, class_weights, weight, 4.0)
    assert got.item() == pytest.approx((0.5 * losses[0] + 2.0 * losses[1]) / 4, rel=1e-6)
    module = BCRSigmoidCrossEntropyLoss(class_weights, loss_weight=3.0)
    assert module(logits, labels).item() == pytest.approx(3 * sum(losses) / 2, rel=1e-6)
    # all weights 1 is plain sigmoid BCE summed over classes
    targets = F.one_hot(labels, 4).float()
    plain = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum") / 2
    assert torch.allclose(bcr_sigmoid_cross_entropy(logits, labels, torch.ones(3)), plain)
    with pytest.raises(ValueError, match="C\\+1"):
        bcr_sigmoid_cross_entropy(logits[:, :3], labels, class_weights)


@pytest.mark.parametrize("samples", ["all", "foreground"])
def test_bcr_gradient_of_each_reading_matches_a_float64_reference(samples):
    """Eq. 20 read for every sample ("all") or for foreground samples only ("foreground", equalization
    loss's exclusion of background proposals): the gradient on each logit is
    weight_n * w(n, i) * (sigmoid(z) - y) / avg_factor, computed here term by term in float64."""
    counts = [1, 3, 20, 300, 5000, 90000]  # C = 6; the rarest class gets w ~ 2e-9
    class_weights = bucketed_class_weights(torch.tensor(counts)).double()
    num_classes = len(counts)
    background = num_classes
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(7, num_classes + 1, dtype=torch.float64, generator=generator, requires_grad=True)
    labels = torch.tensor([0, 5, background, background, 2, background, 3])
    weight = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.5], dtype=torch.float64)
    loss = bcr_sigmoid_cross_entropy(logits, labels, class_weights, weight, 5.0, samples=samples)
    (grad,) = torch.autograd.grad(loss, logits)

    def term_weight(label: int, i: int) -> float:
        if i == background or i == label or (samples == "foreground" and label == background):
            return 1.0
        return class_weights[i].item()

    expected_loss, expected_grad = 0.0, []
    for n, label in enumerate(labels.tolist()):
        row = []
        for i, z in enumerate(logits[n].tolist()):
            y = 1.0 if i == label else 0.0
            p = 1.0 / (1.0 + math.exp(-z))
            w = term_weight(label, i)
            expected_loss += weight[n].item() * w * -(y * math.log(p) + (1 - y) * math.log(1 - p)) / 5.0
            row.append(weight[n].item() * w * (p - y) / 5.0)
        expected_grad.append(row)
    assert loss.item() == pytest.approx(expected_loss, rel=1e-12)
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=torch.float64), rtol=1e-12, atol=1e-15)
    # The difference between the readings: a background RoI's negative gradient on the rarest class.
    rare_on_background = grad[2, 0].item() * 5.0
    sigmoid = torch.sigmoid(logits[2, 0]).item()
    if samples == "all":
        assert 0 < rare_on_background < 1e-8 * sigmoid
    else:
        assert rare_on_background == pytest.approx(sigmoid, rel=1e-12)
    # Foreground rows are the same under both readings.
    other = "foreground" if samples == "all" else "all"
    (other_grad,) = torch.autograd.grad(
        bcr_sigmoid_cross_entropy(logits, labels, class_weights, weight, 5.0, samples=other), logits
    )
    foreground = labels != background
    torch.testing.assert_close(grad[foreground], other_grad[foreground], rtol=0, atol=0)
    assert not torch.equal(grad[~foreground], other_grad[~foreground])
    module = BCRSigmoidCrossEntropyLoss(class_weights.float(), samples=samples)
    assert module.samples == samples and f"samples='{samples}'" in repr(module)
    with pytest.raises(ValueError, match="samples must be one of all, foreground"):
        BCRSigmoidCrossEntropyLoss(class_weights.float(), samples="background")


# ----------------------------------------------------------------------------- basic


def test_basic_losses_match_torch():
    torch.manual_seed(4)
    pred, target = torch.randn(8, 4), torch.randn(8, 4)
    assert torch.allclose(smooth_l1_loss(pred, target, 0.5), F.smooth_l1_loss(pred, target, reduction="none", beta=0.5))
    assert torch.allclose(l1_loss(pred, target), (pred - target).abs())
    weight = torch.rand(8)
    assert torch.allclose(
        SmoothL1Loss(beta=1 / 9)(pred, target, weight, 3),
        (F.smooth_l1_loss(pred, target, reduction="none", beta=1 / 9) * weight[:, None]).sum() / 3,
    )
    assert torch.allclose(L1Loss(loss_weight=2)(pred, target), 2 * (pred - target).abs().mean())

    logits, labels = torch.randn(8, 5), torch.randint(0, 5, (8,))
    ce = F.cross_entropy(logits, labels, reduction="none")
    assert torch.allclose(cross_entropy(logits, labels), ce.mean())
    assert torch.allclose(CrossEntropyLoss(loss_weight=0.5)(logits, labels, weight, 2.0), 0.5 * (ce * weight).sum() / 2)

    scores, targets = torch.randn(10), (torch.rand(10) > 0.5).float()
    mask = (torch.rand(10) > 0.3).float()
    bce = F.binary_cross_entropy_with_logits(scores, targets, reduction="none")
    expected = (bce * mask).sum() / mask.sum()
    assert torch.allclose(binary_cross_entropy_with_logits(scores, targets, mask, mask.sum()), expected)


def test_weighted_sum_and_bad_input():
    loss = torch.arange(8.0).view(2, 4)
    assert weighted_sum(loss).item() == pytest.approx(3.5)
    assert weighted_sum(loss, torch.tensor([1.0, 0.0]), 2).item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="weight"):
        weighted_sum(loss, torch.ones(4))
    with pytest.raises(ValueError, match="beta"):
        smooth_l1_loss(loss, loss, beta=0)
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(torch.zeros(3, 4), torch.zeros(3))  # float labels
