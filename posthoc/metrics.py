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

No non-finite number is a metric: both accumulators count the images whose probabilities hold NaN or
infinity (a model with damaged weights, an input it cannot handle), and :meth:`ClassificationMetrics.compute`
and :meth:`EnsembleMetrics.compute` refuse to report figures when there are any, with one line saying how
many images of how many (:func:`check_finite_outputs`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import distributed
from .errors import PosthocError

ECE_BINS = 15
PROB_FLOOR = 1e-12
HEAD = ("count", "correct1", "correct5", "nll_sum", "brier_sum", "nonfinite")


def nonfinite_rows(values: torch.Tensor) -> torch.Tensor:
    """A mask over the last-but-one dimension of ``values`` (..., B, C): the images whose row holds NaN or inf."""
    return ~torch.isfinite(values).all(dim=-1)


def check_finite_outputs(bad: int, total: int, what: str = "the model") -> None:
    """One line when ``bad`` of ``total`` images got non-finite outputs: never a metric computed from them."""
    if bad:
        raise PosthocError(
            f"{what} gave non-finite outputs (NaN or infinity) for {bad} of {total} images, so no metric is reported; "
            "its weights or the preprocessing (--mean, --std, --img-size) are broken"
        )


class ClassificationMetrics:
    """Accumulates top-1, top-5, NLL, ECE and Brier over batches of probabilities.

    Each batch adds one row of float64 sums (count, hits, NLL, Brier, non-finite rows, and count / confidence / hits per
    ECE bin: ``6 + 3 * num_bins`` numbers), folded in batch order. When a loader's batches were split
    across processes (:class:`posthoc.distributed.ShardedBatches`), :meth:`reduce` gathers every process's
    rows, so the result is bit-identical to one process's.
    """

    def __init__(self, num_bins: int = ECE_BINS):
        self.num_bins = num_bins
        self.reset()

    def reset(self) -> None:
        self.rows: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``probs`` (B, C) rows summing to 1, ``target`` (B,) class indices."""
        probs = probs.detach().double().cpu()
        target = target.detach().long().cpu()
        nonfinite = int(nonfinite_rows(probs).sum())
        if nonfinite:  # counted and refused in compute(); the sums below stay finite
            probs = torch.nan_to_num(probs, nan=0.0, posinf=1.0, neginf=0.0)
        n, c = probs.shape
        conf, pred = probs.max(dim=1)
        hit = pred.eq(target)
        topk = probs.topk(min(5, c), dim=1).indices
        p_true = probs.gather(1, target[:, None]).squeeze(1)
        onehot = torch.nn.functional.one_hot(target, c).double()
        # bin b holds confidences in (b/B, (b+1)/B]; confidence 0 falls in bin 0
        bins = (conf * self.num_bins).ceil().long().clamp(1, self.num_bins) - 1
        sums = torch.tensor(
            [
                n,
                int(hit.sum()),
                int(topk.eq(target[:, None]).any(dim=1).sum()),
                float(-p_true.clamp_min(PROB_FLOOR).log().sum()),
                float(((probs - onehot) ** 2).sum()),
                nonfinite,
            ],
            dtype=torch.float64,
        )
        histogram = [
            torch.bincount(bins, minlength=self.num_bins).double(),
            torch.bincount(bins, weights=conf, minlength=self.num_bins),
            torch.bincount(bins, weights=hit.double(), minlength=self.num_bins),
        ]
        self.rows.append(torch.cat([sums, *histogram]))

    def reduce(self) -> None:
        """Every process's batches, in batch order, on every process (a no-op with one process)."""
        self.rows = [row for part in distributed.all_gather(self.rows) for row in part]

    def totals(self) -> dict[str, torch.Tensor]:
        """The sums over every batch: ``count``, ``correct1``, ``correct5``, ``nll_sum``, ``brier_sum``,
        ``nonfinite`` (images whose probabilities were not finite) and the per-bin ``bin_count``, ``bin_conf``,
        ``bin_correct``."""
        h, b = len(HEAD), self.num_bins
        total = torch.zeros(h + 3 * b, dtype=torch.float64)
        for row in self.rows:
            total += row
        return {
            **dict(zip(HEAD, total[:h])),
            "bin_count": total[h : h + b],
            "bin_conf": total[h + b : h + 2 * b],
            "bin_correct": total[h + 2 * b :],
        }

    @property
    def count(self) -> int:
        """Images seen so far (on this process, until :meth:`reduce`)."""
        return int(sum(int(row[0]) for row in self.rows))

    def compute(self) -> dict[str, float]:
        """``top1``, ``top5``, ``ece`` in percent; ``nll`` and ``brier`` as means per image (one line instead
        when any image's probabilities were not finite)."""
        t = self.totals()
        check_finite_outputs(int(t["nonfinite"]), int(t["count"]))
        n = max(int(t["count"]), 1)
        gap = (t["bin_correct"] - t["bin_conf"]).abs().sum()
        return {
            "top1": 100.0 * int(t["correct1"]) / n,
            "top5": 100.0 * int(t["correct5"]) / n,
            "nll": float(t["nll_sum"]) / n,
            "ece": 100.0 * float(gap) / n,
            "brier": float(t["brier_sum"]) / n,
        }

    def reliability(self) -> list[dict[str, float]]:
        """Per-bin ``count``, mean ``confidence`` and ``accuracy`` (for reliability diagrams)."""
        t = self.totals()
        rows = []
        for b in range(self.num_bins):
            c = float(t["bin_count"][b])
            rows.append(
                {
                    "lower": b / self.num_bins,
                    "upper": (b + 1) / self.num_bins,
                    "count": int(c),
                    "confidence": float(t["bin_conf"][b]) / c if c else float("nan"),
                    "accuracy": float(t["bin_correct"][b]) / c if c else float("nan"),
                }
            )
        return rows


class EnsembleMetrics:
    """Mean member top-1 (%) and mean pairwise disagreement (%) from per-member probabilities; one row of
    sums per batch (count, disagreement, hits per member), reduced across processes as
    :class:`ClassificationMetrics`."""

    def __init__(self):
        self.rows: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, member_probs: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``member_probs`` (K, B, C), ``target`` (B,)."""
        nonfinite = int(nonfinite_rows(member_probs.detach()).any(dim=0).sum())
        preds = member_probs.detach().argmax(dim=-1).cpu()  # (K, B)
        target = target.detach().long().cpu()
        k = preds.shape[0]
        correct = preds.eq(target[None]).sum(dim=1).double()
        disagree = 0.0
        if k > 1:
            differ = preds[:, None, :].ne(preds[None, :, :]).double().sum(dim=-1)  # (K, K)
            disagree = float(differ.triu(diagonal=1).sum()) / (k * (k - 1) / 2)
        self.rows.append(torch.cat([torch.tensor([preds.shape[1], disagree, nonfinite], dtype=torch.float64), correct]))

    def reduce(self) -> None:
        """Every process's batches, in batch order, on every process (a no-op with one process)."""
        self.rows = [row for part in distributed.all_gather(self.rows) for row in part]

    def compute(self) -> dict[str, float]:
        """``member_top1`` (mean, min, max over members) and ``disagreement``, in percent."""
        if not self.rows:
            return {}
        total = torch.zeros_like(self.rows[0])
        for row in self.rows:
            total += row
        check_finite_outputs(int(total[2]), int(total[0]), "a member of the ensemble")
        n = max(int(total[0]), 1)
        member_top1 = 100.0 * total[3:] / n
        return {
            "member_top1": float(member_top1.mean()),
            "member_top1_min": float(member_top1.min()),
            "member_top1_max": float(member_top1.max()),
            "disagreement": 100.0 * float(total[1]) / n,
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
