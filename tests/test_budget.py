"""Inference cost: FLOPs ratios against a hand count, ``--inference-budget`` for every method, explicit
options that override it."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from posthoc import Ensemble
from posthoc.artifact import read
from posthoc.cli import main
from posthoc.cost import flops_ratio, forward_flops, predicted_ratio, split_flops
from posthoc.fused import EnsembleModule

from .helpers import QUIET, save_hub_layout, tiny_model


def _members(parent, k: int, head_only: bool):
    out = []
    for i in range(k):
        m = copy.deepcopy(parent)
        with torch.no_grad():
            for p in m.get_classifier().parameters() if head_only else m.parameters():
                p.add_(0.01 * (i + 1))
        out.append(m)
    return out


def test_flops_ratio_matches_a_hand_count():
    parent = tiny_model("test_resnet")
    total = forward_flops(parent)
    fc = 2 * parent.fc.in_features * parent.fc.out_features  # one multiply-add per weight, counted as 2 FLOPs
    for k in (2, 5):
        head = EnsembleModule(Ensemble.from_models(_members(parent, k, head_only=True)))
        full = EnsembleModule(Ensemble.from_models(_members(parent, k, head_only=False)))
        assert flops_ratio(head, parent) == pytest.approx((total + (k - 1) * fc) / total, rel=1e-9)
        assert flops_ratio(full, parent) == pytest.approx(k, rel=1e-9)
    assert split_flops(parent, 1) == (total - fc, fc)
    assert predicted_ratio(split_flops(parent, 1), 3) == pytest.approx((total + 2 * fc) / total)


FAST = {
    "noisy": ["--population", "8", "--kl-samples", "20", "--bn-batches", "1"],
    "resample": ["--epochs", "0.5", "--batch-size", "16", "--bn-batches", "1"],
    "lastlayer": ["--epochs-per-layer", "1", "--batch-size", "16"],
    "supernet": ["--epochs-per-layer", "1", "--coupling-epochs", "1", "--batch-size", "16"],
    "sparse": ["--child-epochs", "0.25", "--batch-size", "16", "--bn-batches", "1"],
}


@pytest.mark.parametrize("method", list(FAST))
def test_budget_of_one_shares_everything_but_the_head(tmp_path, capsys, resnet_dir, image_data, method):
    out = tmp_path / method
    args = [
        "boost",
        str(resnet_dir),
        "--method",
        method,
        "--data",
        str(image_data),
        "--out",
        str(out),
        *QUIET,
        "--inference-budget",
        "1.0",
        *FAST[method],
    ]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "--inference-budget 1:" in printed and "forward FLOPs (x parent)" in printed
    ens, config = read(out)
    head = {"fc.weight", "fc.bias"}
    group = ens.groups[0]
    assert len(ens.groups) == 1 and (ens.num_members == 1 or set(group.member_tensors) <= head), sorted(group.member_tensors)
    cost = config["method"]["measured"]["inference_cost"]
    assert cost["budget"] == 1.0 and round(cost["flops_ratio"], 2) <= 1.0 and cost["time_ratio"] > 0


def test_explicit_options_override_the_budget_with_a_note(tmp_path, capsys, resnet_dir, image_data):
    args = [
        "boost",
        str(resnet_dir),
        "--method",
        "noisy",
        "--data",
        str(image_data),
        "--out",
        str(tmp_path / "n"),
        *QUIET,
        "--inference-budget",
        "1.5",
        "--members",
        "3",
        "--last-layers",
        "5",
        *FAST["noisy"],
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "--members and --last-layers were given: they override --inference-budget 1.5" in captured.out
    assert "over --inference-budget 1.5, because of the options given explicitly" in captured.err
    config = json.loads((tmp_path / "n" / "config.json").read_text())
    assert config["method"]["config"]["members"] == 3 and config["method"]["config"]["last_layers"] == 5
    assert config["method"]["measured"]["inference_cost"]["flops_ratio"] > 1.5


def test_budget_between_one_and_two_shares_a_trunk(tmp_path, resnet_dir, image_data):
    args = [
        "boost",
        str(resnet_dir),
        "--method",
        "noisy",
        "--data",
        str(image_data),
        "--out",
        str(tmp_path / "n"),
        *QUIET,
        "--inference-budget",
        "1.5",
        *FAST["noisy"],
    ]
    assert main(args) == 0
    config = json.loads((tmp_path / "n" / "config.json").read_text())
    chosen = config["method"]["config"]
    assert chosen["last_layers"] is not None and chosen["members"] >= 4
    assert 1.0 < config["method"]["measured"]["inference_cost"]["flops_ratio"] <= 1.505


def test_resample_chooses_between_mean_and_draws_on_select(tmp_path, resnet_dir, image_data):
    args = [
        "boost",
        str(resnet_dir),
        "--method",
        "resample",
        "--data",
        str(image_data),
        "--out",
        str(tmp_path / "r"),
        *QUIET,
        "--inference-budget",
        "3",
        *FAST["resample"],
    ]
    assert main(args) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    choices = config["method"]["measured"]["budget_choice"]
    assert [(c["include_mean"], c["members"]) for c in choices] == [(True, 1), (False, 3), (True, 3)]
    best = min(choices, key=lambda c: (c["select_nll"], c["members"]))
    assert config["num_members"] == best["members"] and config["method"]["config"]["members"] == best["members"]


def test_supernet_of_several_checkpoints_must_fit(tmp_path, capsys, resnet_dir, image_data):
    other = save_hub_layout(tiny_model("test_resnet", seed=1), tmp_path / "p1")
    args = [
        "boost",
        str(resnet_dir),
        str(other),
        "--method",
        "supernet",
        "--data",
        str(image_data),
        "--out",
        str(tmp_path / "s"),
        "--inference-budget",
        "1.5",
        *FAST["supernet"],
    ]
    assert main(args) == 2
    assert "runs 2 full networks (2.00x), over --inference-budget 1.5" in capsys.readouterr().err


def test_budget_below_one_is_refused(tmp_path, capsys, resnet_dir, image_data):
    args = [
        "boost",
        str(resnet_dir),
        "--method",
        "noisy",
        "--data",
        str(image_data),
        "--out",
        str(tmp_path / "x"),
        "--inference-budget",
        "0.5",
    ]
    assert main(args) == 2 and "--inference-budget must be at least 1" in capsys.readouterr().err
