"""Bucketed class re-weighting (BCR) for sigmoid cross-entropy (Sec. 3.3.3, Eq. 20-23).

With a sigmoid classifier, every sample of class t pushes the scores of all other
classes down. For rare classes these "discouraging" gradients dominate, because they
have few positives. BCR scales the negative term of class i by a weight w_i that is
~0 for rare classes and ~1 for frequent ones:

    f'_i = ln f_i                                   (Eq. 21, f_i = #training images with class i)
    s_i  = bucket of f'_i among S equal ranges of [min f', max f']
    x_i  = s_i / (S - 1)                            (Eq. 22)
    w_i  = 1 / (1 + exp(-(x_i - a) / t))            (Eq. 23, S 10, a 0.5, t 0.025)

and the loss of a sample of class t is L = -sum_i w_i log(p_i) (Eq. 20), where the
background term and the term of the sample's own class t keep weight 1.

Which samples are re-weighted (``samples``): the paper writes Eq. 20 for "a training sample" of
class t, with i = 0 the background, and does not exempt background samples (t = 0):

- ``"all"`` (Eq. 20 as written, the default): every sampled RoI, background ones included, scales
  the negative term of class i by w_i. With S = 10, a = 0.5, t = 0.025 the rarest buckets get
  w <= 1.3e-3, so their scores receive almost no negative gradient from any RoI, including the
  ~75% background RoIs of a 512-RoI batch.
- ``"foreground"``: only foreground samples (t = 1..C) down-weight other classes' terms; a
  background RoI keeps weight 1 on every class. This is how equalization loss (Tan et al. 2020,
  the paper's ref. [53], which motivates BCR in Sec. 3.3.3) applies its weights: its exclusion
  term E(r) is 1 for foreground and 0 for background proposals.

Layout choice: the paper indexes background as i = 0; this project puts it LAST
(index C), so the classifier has C + 1 sigmoid outputs and a background sample has
one-hot target on column C. Column C always has weight 1.

Depends on torch only, so this file can be copied into another code base.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["bucketed_class_weights", "bcr_sigmoid_cross_entropy", "BCRSigmoidCrossEntropyLoss", "BCR_SAMPLES"]

# Which samples' terms BCR down-weights (module docstring): Eq. 20 for every sample, or foreground only.
BCR_SAMPLES = ("all", "foreground")


def bucketed_class_weights(image_counts: Tensor, num_buckets: int = 10, a: float = 0.5, t: float = 0.025) -> Tensor:
    """Per-class BCR weights w_i (Eq. 21-23).

    Args:
        image_counts: [C] number of training images containing each class (f_i).
            Counts are clamped to >= 1 before the log, so a class with no training
            image is treated like a class seen once (the rarest bucket) instead of
            producing ln(0) = -inf.
        num_buckets: S >= 2, the number of equal ranges of [min ln f, max ln f].
            The maximum falls into the last bucket S - 1. If all classes have the same
            frequency there is nothing to balance and all of them go to the last bucket
            (weight ~1, i.e. plain sigmoid CE).
        a: turning point of the sigmoid on the normalised bucket index x in [0, 1].
        t: temperature (> 0); smaller t gives a sharper step.

    Returns:
        [C] float32 weights in (0, 1), non-decreasing in the class frequency.
    """
    if image_counts.dim() != 1 or image_counts.numel() == 0:
        raise ValueError(f"image_counts must be a non-empty 1-D tensor [C], got shape {tuple(image_counts.shape)}")
    if num_buckets < 2:
        raise ValueError(f"num_buckets must be >= 2 (x_i = s_i / (S - 1)), got {num_buckets}")
    if not t > 0:
        raise ValueError(f"temperature t must be > 0, got {t}")
    counts = image_counts.to(torch.float64)
    if bool((counts < 0).any()):  # one-off setup check, a host sync is fine here
        raise ValueError("image_counts must be >= 0 (numbers of training images per class)")
    log_freq = counts.clamp(min=1.0).log()  # Eq. 21
    low, high = log_freq.min(), log_freq.max()
    bucket_width = (high - low) / num_buckets
    bucket = torch.floor((log_freq - low) / bucket_width.clamp(min=torch.finfo(torch.float64).tiny))
    bucket = torch.where(bucket_width > 0, bucket, torch.full_like(bucket, num_buckets - 1))
    bucket = bucket.clamp(0, num_buckets - 1)  # the maximum itself lands on S, it belongs to S - 1
    x = bucket / (num_buckets - 1)  # Eq. 22
    return torch.sigmoid((x - a) / t).to(torch.float32)  # Eq. 23


def bcr_sigmoid_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    class_weights: Tensor,
    weight: Tensor | None = None,
    avg_factor: float | Tensor | None = None,
    samples: str = "all",
) -> Tensor:
    """Sigmoid cross-entropy over C + 1 outputs with BCR term weights (Eq. 20).

    For a sample with label t the binary CE term of output i is weighted by
    class_weights[i], except the background output (i = C) and i = t, which get 1.
    With ``samples="foreground"`` a background sample (t = C) keeps weight 1 on every
    output (module docstring). A sample's loss is the sum of its C + 1 weighted terms.

    Args:
        logits: [N, C+1] sigmoid logits (background is the last column).
        labels: [N] int64 in [0, C] (C = background).
        class_weights: [C] weights from ``bucketed_class_weights``.
        weight: [N] per-sample weights or None.
        avg_factor: divisor of the weighted sum; None means the mean over the N samples.
        samples: ``"all"`` (Eq. 20 for every sample) or ``"foreground"`` (background samples
            are not re-weighted).

    Returns:
        Scalar sum_n(weight_n * L_n) / avg_factor.
    """
    if samples not in BCR_SAMPLES:
        raise ValueError(f"samples must be one of {', '.join(BCR_SAMPLES)}, got {samples!r}")
    if class_weights.dim() != 1:
        raise ValueError(f"class_weights must be [C], got shape {tuple(class_weights.shape)}")
    num_classes = class_weights.shape[0]
    if logits.dim() != 2 or logits.shape[1] != num_classes + 1:
        raise ValueError(
            f"logits must be [N, C+1] = [N, {num_classes + 1}] for {num_classes} class weights, "
            f"got shape {tuple(logits.shape)}"
        )
    if labels.dim() != 1 or labels.shape[0] != logits.shape[0] or labels.dtype != torch.int64:
        raise ValueError(
            f"labels must be int64 [N] with N = {logits.shape[0]}, got {labels.dtype} {tuple(labels.shape)}"
        )
    # scatter rather than F.one_hot: one_hot reads labels.max() on the host
    targets = torch.zeros_like(logits).scatter_(1, labels[:, None], 1.0)
    background_weight = class_weights.new_ones(1)
    term_weights = torch.cat([class_weights, background_weight]).to(logits.dtype).expand_as(logits)
    term_weights = torch.where(targets > 0, torch.ones_like(term_weights), term_weights)  # own class: 1
    if samples == "foreground":
        background = (labels == num_classes)[:, None]  # a background RoI keeps weight 1 on every class
        term_weights = torch.where(background, torch.ones_like(term_weights), term_weights)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    per_sample = (bce * term_weights).sum(dim=1)
    if weight is not None:
        if weight.shape != per_sample.shape:
            raise ValueError(f"weight must be [N] = {tuple(per_sample.shape)}, got {tuple(weight.shape)}")
        per_sample = per_sample * weight
    if avg_factor is None:
        return per_sample.sum() / max(per_sample.numel(), 1)
    if isinstance(avg_factor, Tensor):
        return per_sample.sum() / avg_factor.to(per_sample.dtype).clamp(min=torch.finfo(per_sample.dtype).tiny)
    return per_sample.sum() / max(float(avg_factor), torch.finfo(per_sample.dtype).tiny)


class BCRSigmoidCrossEntropyLoss(nn.Module):
    """Module form of ``bcr_sigmoid_cross_entropy``; ``class_weights`` [C] is kept as a buffer
    (so a checkpoint carries the weights it was trained with).

    Build the weights once from the training set: ``bucketed_class_weights(image_counts)``, or
    :meth:`from_image_counts`. :meth:`without_frequencies` makes a stand-in for a model that is
    only evaluated (test-time scoring does not read the weights; a checkpoint's weights load into
    it), which refuses to compute a training loss until real weights are loaded.
    """

    use_sigmoid = True  # test-time scores are per-class sigmoids (Sec. 3.3.3)

    def __init__(self, class_weights: Tensor, loss_weight: float = 1.0, samples: str = "all"):
        super().__init__()
        if class_weights.dim() != 1:
            raise ValueError(f"class_weights must be [C], got shape {tuple(class_weights.shape)}")
        if samples not in BCR_SAMPLES:
            raise ValueError(f"samples must be one of {', '.join(BCR_SAMPLES)}, got {samples!r}")
        self.register_buffer("class_weights", class_weights.detach().clone().float())
        self.loss_weight = loss_weight
        self.samples = samples
        self.has_frequencies = True

    @classmethod
    def from_image_counts(
        cls,
        image_counts: Tensor,
        num_buckets: int = 10,
        a: float = 0.5,
        t: float = 0.025,
        loss_weight: float = 1.0,
        samples: str = "all",
    ) -> "BCRSigmoidCrossEntropyLoss":
        """The loss with the weights of Eq. 21-23 for ``image_counts`` [C] (f_i: training images per class)."""
        return cls(bucketed_class_weights(torch.as_tensor(image_counts), num_buckets, a, t), loss_weight, samples)

    @classmethod
    def without_frequencies(
        cls, num_classes: int, loss_weight: float = 1.0, samples: str = "all"
    ) -> "BCRSigmoidCrossEntropyLoss":
        """A stand-in with C unit weights whose forward refuses to run until ``class_weights`` is
        loaded from a state dict (a trained checkpoint)."""
        loss = cls(torch.ones(num_classes), loss_weight, samples)
        loss.has_frequencies = False
        return loss

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 (nn.Module's hook)
        if prefix + "class_weights" in state_dict:
            self.has_frequencies = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(
        self,
        logits: Tensor,
        labels: Tensor,
        weight: Tensor | None = None,
        avg_factor: float | Tensor | None = None,
    ) -> Tensor:
        """logits: [N, C+1]; labels: [N] int64; weight: [N] or None; returns a scalar."""
        if not self.has_frequencies:
            raise ValueError(
                "bucketed class re-weighting needs the training set's class frequencies: build the model with "
                "class_image_counts=dataset.image_counts_per_class() (train.py does), or load a trained checkpoint"
            )
        return self.loss_weight * bcr_sigmoid_cross_entropy(
            logits, labels, self.class_weights, weight, avg_factor, samples=self.samples
        )

    def extra_repr(self) -> str:
        return f"samples={self.samples!r}, loss_weight={self.loss_weight}"
