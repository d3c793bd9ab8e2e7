"""Each metric against a hand-computed case."""

from __future__ import annotations

import math

import pytest
import torch

from posthoc.metrics import ClassificationMetrics, EnsembleMetrics

PROBS = torch.tensor(
    [
        [0.70, 0.20, 0.10],  # y=0, correct, confidence 0.70 -> bin (0.667, 0.733]
        [0.10, 0.62, 0.28],  # y=2, wrong,   confidence 0.62 -> bin (0.600, 0.667]
        [0.18, 0.20, 0.62],  # y=2, correct, confidence 0.62 -> bin (0.600, 0.667]
        [0.52, 0.38, 0.10],  # y=1, wrong,   confidence 0.52 -> bin (0.467, 0.533]
    ]
)
TARGET = torch.tensor([0, 2, 2, 1])


def computed(batches):
    m = ClassificationMetrics()
    for p, y in batches:
        m.update(p, y)
    return m.compute()


def test_hand_computed_case():
    r = computed([(PROBS, TARGET)])
    assert r["top1"] == pytest.approx(50.0)
    assert r["top5"] == pytest.approx(100.0)  # 3 classes: the top-5 always holds the label
    assert r["nll"] == pytest.approx(-(math.log(0.70) + math.log(0.28) + math.log(0.62) + math.log(0.38)) / 4)
    brier = (
        (0.3**2 + 0.2**2 + 0.1**2) + (0.1**2 + 0.62**2 + 0.72**2) + (0.18**2 + 0.2**2 + 0.38**2) + (0.52**2 + 0.62**2 + 0.1**2)
    )
    assert r["brier"] == pytest.approx(brier / 4)
    # bins: |1 - 0.70| + |1 - (0.62 + 0.62)| + |0 - 0.52|, over 4 images
    assert r["ece"] == pytest.approx(100 * (0.30 + 0.24 + 0.52) / 4)


def test_streaming_equals_one_batch():
    assert computed([(PROBS[:1], TARGET[:1]), (PROBS[1:], TARGET[1:])]) == pytest.approx(computed([(PROBS, TARGET)]))


def test_top5_misses_when_label_ranks_sixth():
    probs = torch.tensor([[0.30, 0.25, 0.20, 0.15, 0.06, 0.04], [0.30, 0.25, 0.20, 0.15, 0.06, 0.04]])
    r = computed([(probs, torch.tensor([5, 4]))])
    assert r["top1"] == 0.0
    assert r["top5"] == pytest.approx(50.0)


def test_nll_is_finite_for_zero_probability():
    r = computed([(torch.tensor([[1.0, 0.0]]), torch.tensor([1]))])
    assert r["nll"] == pytest.approx(-math.log(1e-12))


def test_reliability_bins_sum_to_count():
    m = ClassificationMetrics()
    m.update(PROBS, TARGET)
    bins = m.reliability()
    assert len(bins) == 15 and sum(b["count"] for b in bins) == 4
    full = [b for b in bins if b["count"]]
    assert [b["count"] for b in full] == [1, 2, 1]
    assert full[1]["accuracy"] == pytest.approx(0.5) and full[1]["confidence"] == pytest.approx(0.62)


def test_ensemble_member_accuracy_and_disagreement():
    preds = torch.tensor([[0, 1, 2, 0], [0, 1, 1, 0], [1, 1, 2, 2]])  # K=3 members, 4 images
    member_probs = torch.nn.functional.one_hot(preds, 3).float()
    m = EnsembleMetrics()
    m.update(member_probs[:, :2], torch.tensor([0, 1]))
    m.update(member_probs[:, 2:], torch.tensor([2, 0]))
    r = m.compute()
    assert r["member_top1"] == pytest.approx((100 + 75 + 50) / 3)
    assert r["member_top1_min"] == pytest.approx(50) and r["member_top1_max"] == pytest.approx(100)
    # pairs (0,1): 1/4 differ, (0,2): 2/4, (1,2): 3/4 -> mean 1/2
    assert r["disagreement"] == pytest.approx(50.0)
