"""Test-time views: the fused forward averages members over views exactly, ``auto`` keeps the mirror only
where it lowers the held-out NLL (never on data whose label the mirror flips), views count in the cost,
old artifacts load as the image alone, and ``eval --tta flip`` scores any model with its mirror."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import posthoc
from posthoc import Combine, Ensemble
from posthoc.calibration import Candidate, score_candidates, with_views
from posthoc.cli import main
from posthoc.commands.eval import evaluate_spec
from posthoc.cost import flops_ratio
from posthoc.fused import EnsembleModule

from .helpers import QUIET, SMALL_CFG, assert_same_artifact, run_boost, save_hub_layout, tiny_model

X = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
FLIP = ("identity", "hflip")


def _by_hand(models, rule: str) -> torch.Tensor:
    """The combine rule applied to every member on the image and on its mirror, in float64."""
    logits = torch.stack([m.double()(v) for m in models for v in (X, X.flip(-1))])
    if rule == "prob_mean":
        return logits.softmax(-1).mean(0)
    if rule == "logit_mean":
        return logits.mean(0).softmax(-1)
    return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).double().mean(0)


@pytest.mark.parametrize("rule", ["prob_mean", "logit_mean", "vote"])
def test_fused_views_equal_averaging_the_members_over_mirrored_batches(rule):
    models = [tiny_model("test_resnet", seed=s).double() for s in range(3)]
    module = EnsembleModule(Ensemble.from_models(models, combine=Combine(rule=rule, views=FLIP))).double().eval()
    with torch.no_grad():
        probs, members = module(X, return_members=True)
        torch.testing.assert_close(probs, _by_hand(models, rule), atol=1e-6, rtol=0)
        per_member = torch.stack([torch.stack([m(X), m(X.flip(-1))]).softmax(-1).mean(0) for m in models])
        torch.testing.assert_close(members, per_member, atol=1e-6, rtol=0)  # each member averaged over views


def test_coupling_averages_the_coupled_prediction_of_each_view():
    models = [tiny_model("test_resnet", seed=s).double() for s in range(2)]
    weight = torch.cat([m.fc.weight.detach() for m in models], dim=1) / 2 + 0.01
    bias = torch.stack([m.fc.bias.detach() for m in models]).mean(0)
    combine = Combine(rule="coupling", coupling_weight=weight, coupling_bias=bias, temperature=1.5, views=FLIP)
    module = EnsembleModule(Ensemble.from_models(models, combine=combine)).double().eval()
    with torch.no_grad():
        coupled = [
            (torch.cat([m.forward_head(m.forward_features(v), pre_logits=True) for m in models], 1) @ weight.T + bias) / 1.5
            for v in (X, X.flip(-1))
        ]
        torch.testing.assert_close(module(X), torch.stack(coupled).softmax(-1).mean(0), atol=1e-6, rtol=0)


def test_two_views_cost_two_passes_and_old_artifacts_load_as_the_image_alone(tmp_path):
    model = tiny_model("test_resnet")
    one = EnsembleModule(Ensemble.from_models([model], combine=Combine(views=FLIP)))
    assert flops_ratio(one, model) == pytest.approx(2.0, rel=1e-9)
    posthoc.save(Ensemble.from_models([model]), tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["combine"]["views"] == ["identity"]
    del config["combine"]["views"]  # as written before views existed (and before the integrity record)
    config.pop("integrity", None)
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    loaded = posthoc.load(tmp_path / "a")
    assert loaded.views == ("identity",)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X.float()), model(X.float()).softmax(-1), atol=1e-5, rtol=0)
    with pytest.raises(posthoc.PosthocError, match="test-time views must be 'identity' followed by"):
        Combine(views=("hflip",))


def test_auto_keeps_the_mirror_where_it_helps_and_refuses_it_where_it_flips_the_label():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (400,), generator=g)
    truth = 3.0 * torch.nn.functional.one_hot(y, 4).float()
    noisy_views = truth + 2.0 * torch.randn(1, 2, 400, 4, generator=g)  # two views: independent noise
    candidates = [Candidate(1, ("identity",)), Candidate(1, FLIP)]
    chosen, _ = score_candidates(candidates, FLIP, noisy_views, None, y, "prob_mean")
    assert chosen.views == FLIP and candidates[1].cv_nll < candidates[0].cv_nll
    mirrored = noisy_views.clone()
    mirrored[:, 1] = noisy_views[:, 0][..., [1, 0, 3, 2]]  # the mirror swaps classes 0<->1 and 2<->3
    candidates = [Candidate(1, ("identity",)), Candidate(1, FLIP)]
    chosen, _ = score_candidates(candidates, FLIP, mirrored, None, y, "prob_mean")
    assert chosen.views == ("identity",) and candidates[1].cv_nll > candidates[0].cv_nll


def _mirror_sensitive_data(root: Path, per_class: dict[str, int]) -> Path:
    """Classes a mirror swaps: a bright square in the left third ('left') or the right third ('right')."""
    rng = np.random.default_rng(0)
    for split, n in per_class.items():
        for name in ("left", "right"):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.normal(90, 25, (32, 32, 3))
                x0 = int(rng.integers(1, 7)) if name == "left" else int(rng.integers(19, 25))
                y0 = int(rng.integers(2, 22))
                img[y0 : y0 + 8, x0 : x0 + 8] = rng.uniform(180, 255, 3)
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / split / name / f"{i:04d}.png")
    return root


def test_calibrate_auto_keeps_the_image_alone_when_the_mirror_swaps_classes(tmp_path, capsys):
    from posthoc.data import make_loader, open_split, resolve_data_config, train_transform
    from posthoc.training import cycle, sgd_with_schedule, train_steps

    data = _mirror_sensitive_data(tmp_path / "data", {"train": 48, "val": 30})
    model = tiny_model("test_resnet", num_classes=2).train()
    loader = make_loader(
        open_split(data, "train", train_transform(resolve_data_config(model), "none")), 16, shuffle=True, workers=0
    )
    opt, sched = sgd_with_schedule(list(model.parameters()), 30, max_lr=0.05, weight_decay=5e-4)
    train_steps(model, cycle(loader, 30), opt, steps=30, scheduler=sched)  # no flips in training: left and right are learnt
    save_hub_layout(model.eval(), tmp_path / "lr")
    assert main(["calibrate", str(tmp_path / "lr"), "--data", str(data), "--workers", "0", "--out", str(tmp_path / "c")]) == 0
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    views = config["method"]["measured"]["views"]
    assert config["combine"]["views"] == ["identity"] and views["tta"] == "auto"
    alone, mirrored = (c["cv_nll"] for c in views["candidates"])
    assert mirrored > alone + 0.1  # averaging a class with its mirror image's class is far worse
    assert "views: identity (1 pass per image)" in capsys.readouterr().out


def test_eval_tta_flip_scores_a_timm_model_with_its_mirror(tmp_path, resnet_dir, image_data, capsys):
    from posthoc.data import eval_transform, make_loader, open_split, resolve_data_config
    from posthoc.metrics import ClassificationMetrics

    r = evaluate_spec(str(resnet_dir), image_data, "val", tta="flip", workers=0, progress=False)
    model = posthoc.load_model(str(resnet_dir))
    loader = make_loader(open_split(image_data, "val", eval_transform(resolve_data_config(model))), 64, workers=0)
    metrics = ClassificationMetrics()
    with torch.no_grad():
        for x, y in loader:
            metrics.update(torch.stack([model(x), model(x.flip(-1))]).softmax(-1).mean(0), y)
    expected = metrics.compute()
    assert r["top1"] == pytest.approx(expected["top1"], abs=1e-3) and r["nll"] == pytest.approx(expected["nll"], abs=1e-4)
    assert main(["eval", str(resnet_dir), "--data", str(image_data), "--tta", "auto", *QUIET]) == 2
    assert "never tunes" in capsys.readouterr().err


def test_eval_overrides_an_artifacts_views_for_one_run_and_says_so(tmp_path, resnet_dir, image_data, capsys):
    posthoc.save(Ensemble.from_models([posthoc.load_model(str(resnet_dir))], combine=Combine(views=FLIP)), tmp_path / "f")
    assert main(["eval", str(tmp_path / "f"), "--data", str(image_data), "--tta", "none", *QUIET]) == 0
    assert "instead of its own identity + hflip" in capsys.readouterr().err
    assert json.loads((tmp_path / "f" / "config.json").read_text())["combine"]["views"] == ["identity", "hflip"]


def test_views_and_members_share_the_inference_budget(tmp_path, resnet_dir, image_data):
    summary = run_boost(
        resnet_dir, "sparse", image_data, tmp_path / "a", members=2, include_parent=True, inference_budget=2.0, tta="auto"
    )
    candidates = summary["notes"]["views"]["candidates"]
    assert [(c["members"], c["views"]) for c in candidates] == [(2, ["identity"]), (1, ["identity", "hflip"])]
    assert candidates[1]["flops_ratio"] == pytest.approx(2.0, abs=1e-3)  # one network seeing two views
    assert summary["cost"]["flops_ratio"] <= 2.0 + 1e-6
    chosen = summary["notes"]["views"]["chosen"]
    assert summary["members"] == chosen["members"] and summary["cost"]["views"] == len(chosen["views"])


def test_same_inputs_same_views_same_bytes(tmp_path, resnet_dir, image_data):
    from posthoc.commands.calibrate import calibrate

    for d in ("a", "b"):
        calibrate(str(resnet_dir), image_data, tmp_path / d, tta="flip", workers=0, log=lambda m: None)
    assert_same_artifact(tmp_path / "a", tmp_path / "b")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["combine"]["views"] == ["identity", "hflip"] and config["method"]["measured"]["views"]["tta"] == "flip"
    card = (tmp_path / "a" / "README.md").read_text()
    assert "Test-time views: identity + hflip (2 passes per image)" in card


def test_a_plain_model_gets_views_as_a_one_member_module():
    model = tiny_model("test_resnet").double()
    module = with_views(model, FLIP, "tiny").double()
    with torch.no_grad():
        torch.testing.assert_close(module(X), _by_hand([model], "prob_mean"), atol=1e-6, rtol=0)
    assert tuple(module.pretrained_cfg["input_size"]) == SMALL_CFG["input_size"]


def test_views_never_change_the_members_and_calibrate_repeats_boosts_last_step(tmp_path, resnet_dir, image_data):
    """boost --tta none has the members of boost --tta auto (same seed); calibrate --tta none --temperature auto on
    the auto artifact then is boost --tta none's artifact (the benchmark's "--tta none" rows rely on both)."""
    from posthoc.commands.calibrate import calibrate

    auto = run_boost(resnet_dir, "sparse", image_data, tmp_path / "auto", members=2, tta="flip")
    run_boost(resnet_dir, "sparse", image_data, tmp_path / "none", members=2, tta="none")
    assert auto["notes"]["views"]["chosen"]["views"] == list(FLIP)
    assert (tmp_path / "auto" / "model.safetensors").read_bytes() == (tmp_path / "none" / "model.safetensors").read_bytes()
    calibrate(
        str(tmp_path / "auto"), image_data, tmp_path / "again", tta="none", temperature="auto", workers=0, log=lambda m: None
    )
    again, built = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("again", "none"))
    assert again["combine"]["views"] == ["identity"]
    assert again["combine"]["temperature"] == pytest.approx(built["combine"]["temperature"], rel=1e-5)
    off = calibrate(
        str(tmp_path / "none"), image_data, tmp_path / "off", tta="none", temperature="off", workers=0, log=lambda m: None
    )
    assert off["temperature"] == built["combine"]["temperature"] and off["after"] is None  # the stored temperature kept
