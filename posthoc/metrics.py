"""Streaming classification and ensemble metrics.

All metrics are computed from class probabilities (the ensemble's averaged probabilities, or a single
model's softmax), accumulated batch by batch so nothing grows with the dataset:

- top-1 / top-5 accuracy (%), as timm's ``validate.py`` reports them;
- NLL: mean of ``-ln p[y]`` (probabilities clamped at 1e-12 so a hard vote cannot give infinity);
- ECE (%): 15 equal-width confidence bins, ``sum_b |B_b|/N * |acc(B_b) - conf(B_b)|``;
- Brier: sum over classes of squared error against the one-hot label, averaged over images.

For an ensemble, :class:`EnsembleMetrics` also takes per-member probabilities and reports the mean
member top-1 and the mean pairwise disagreement (fraction of images on which two members' top-1
predictions differ, averaged over all member pairs).

:func:`fit_temperature` is the one temperature fit every method and ``posthoc calibrate`` use.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

ECE_BINS = 15
PROB_FLOOR = 1e-12


class ClassificationMetrics:
    """Accumulates top-1, top-5, NLL, ECE and Brier over batches of probabilities."""

    def __init__(self, num_bins: int = ECE_BINS):
        self.num_bins = num_bins
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.correct1 = 0
        self.correct5 = 0
        self.nll_sum = 0.0
        self.brier_sum = 0.0
        self.bin_count = torch.zeros(self.num_bins, dtype=torch.float64)
        self.bin_conf = torch.zeros(self.num_bins, dtype=torch.float64)
        self.bin_correct = torch.zeros(self.num_bins, dtype=torch.float64)

    @torch.no_grad()
    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``probs`` (B, C) rows summing to 1, ``target`` (B,) class indices."""
        probs = probs.detach().double().cpu()
        target = target.detach().long().cpu()
        n, c = probs.shape
        conf, pred = probs.max(dim=1)
        hit = pred.eq(target)
        topk = probs.topk(min(5, c), dim=1).indices
        self.count += n
        self.correct1 += int(hit.sum())
        self.correct5 += int(topk.eq(target[:, None]).any(dim=1).sum())
        p_true = probs.gather(1, target[:, None]).squeeze(1)
        self.nll_sum += float(-p_true.clamp_min(PROB_FLOOR).log().sum())
        onehot = torch.nn.functional.one_hot(target, c).double()
        self.brier_sum += float(((probs - onehot) ** 2).sum())
        # bin b holds confidences in (b/B, (b+1)/B]; confidence 0 falls in bin 0
        bins = (conf * self.num_bins).ceil().long().clamp(1, self.num_bins) - 1
        self.bin_count += torch.bincount(bins, minlength=self.num_bins).double()
        self.bin_conf += torch.bincount(bins, weights=conf, minlength=self.num_bins)
        self.bin_correct += torch.bincount(bins, weights=hit.double(), minlength=self.num_bins)

    def compute(self) -> dict[str, float]:
        """``top1``, ``top5``, ``ece`` in percent; ``nll`` and ``brier`` as means per image."""
        n = max(self.count, 1)
        gap = (self.bin_correct - self.bin_conf).abs().sum()
        return {
            "top1": 100.0 * self.correct1 / n,
            "top5": 100.0 * self.correct5 / n,
            "nll": self.nll_sum / n,
            "ece": 100.0 * float(gap) / n,
            "brier": self.brier_sum / n,
        }

    def reliability(self) -> list[dict[str, float]]:
        """Per-bin ``count``, mean ``confidence`` and ``accuracy`` (for reliability diagrams)."""
        rows = []
        for b in range(self.num_bins):
            c = float(self.bin_count[b])
            rows.append(
                {
                    "lower": b / self.num_bins,
                    "upper": (b + 1) / self.num_bins,
                    "count": int(c),
                    "confidence": float(self.bin_conf[b]) / c if c else float("nan"),
                    "accuracy": float(self.bin_correct[b]) / c if c else float("nan"),
                }
            )
        return rows


class EnsembleMetrics:
    """Mean member top-1 (%) and mean pairwise disagreement (%) from per-member probabilities."""

    def __init__(self):
        self.count = 0
        self.member_correct: torch.Tensor | None = None
        self.disagree = 0.0

    @torch.no_grad()
    def update(self, member_probs: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``member_probs`` (K, B, C), ``target`` (B,)."""
        preds = member_probs.detach().argmax(dim=-1).cpu()  # (K, B)
        target = target.detach().long().cpu()
        k = preds.shape[0]
        correct = preds.eq(target[None]).sum(dim=1).double()
        self.member_correct = correct if self.member_correct is None else self.member_correct + correct
        self.count += preds.shape[1]
        if k > 1:
            differ = preds[:, None, :].ne(preds[None, :, :]).double().sum(dim=-1)  # (K, K)
            self.disagree += float(differ.triu(diagonal=1).sum()) / (k * (k - 1) / 2)

    def compute(self) -> dict[str, float]:
        """``member_top1`` (mean, min, max over members) and ``disagreement``, in percent."""
        if self.member_correct is None:
            return {}
        n = max(self.count, 1)
        member_top1 = 100.0 * self.member_correct / n
        return {
            "member_top1": float(member_top1.mean()),
            "member_top1_min": float(member_top1.min()),
            "member_top1_max": float(member_top1.max()),
            "disagreement": 100.0 * self.disagree / n,
        }


def scores(logits: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> dict[str, float]:
    """top-1 (%), NLL and ECE (%) of ``softmax(logits / temperature)``."""
    m = ClassificationMetrics()
    m.update((logits.float() / temperature).softmax(-1), y)
    r = m.compute()
    return {"top1": r["top1"], "nll": r["nll"], "ece": r["ece"]}


def fit_temperature(
    logits: torch.Tensor,
    y: torch.Tensor,
    combine: Callable[[torch.Tensor], torch.Tensor] | None = None,
    iterations: int = 60,
) -> float:
    """The temperature minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    With ``combine`` (scaled logits -> class probabilities, e.g. the mean of K members' softmaxes over
    logits of shape (K, N, C)) the NLL of ``combine(logits / T)`` is minimised instead: an ensemble's
    temperature divides every member's logits, as the artifact applies it. A grid over log T in
    [1/20, 20] brackets the minimum, then a golden-section search refines it, in float64.
    """
    logits, y = logits.double(), y.long()

    def nll(log_t: float) -> float:
        scaled = logits / math.exp(log_t)
        if combine is None:
            return float(F.cross_entropy(scaled, y))
        probs = combine(scaled)
        return float(-probs.gather(-1, y[:, None]).clamp_min(PROB_FLOOR).log().mean())

    grid = [math.log(0.05) + i * (math.log(400.0) / 40) for i in range(41)]
    values = [nll(t) for t in grid]
    best = min(range(len(grid)), key=values.__getitem__)
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)


def mean_disagreement(member_logits: list[torch.Tensor]) -> float:
    """Mean pairwise disagreement (%) of the members' top-1 predictions."""
    preds = [lg.argmax(-1) for lg in member_logits]
    pairs = [(i, j) for i in range(len(preds)) for j in range(i + 1, len(preds))]
    if not pairs:
        return 0.0
    return 100.0 * sum(float((preds[i] != preds[j]).float().mean()) for i, j in pairs) / len(pairs)
