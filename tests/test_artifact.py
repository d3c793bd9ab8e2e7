"""The ensemble artifact: round trip, fused == loop, shared trunk runs once, atomic writes, damage."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import posthoc
from posthoc import Combine, Ensemble, PosthocError, Provenance
from posthoc.artifact import read_config
from posthoc.cli import main
from posthoc.fused import EnsembleModule

from .helpers import QUIET, save_hub_layout, tiny_model

X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def member_logits(models, x=X):
    with torch.no_grad():
        return torch.stack([m.eval()(x) for m in models])


def head_only_members(k=4):
    parent = tiny_model("test_resnet", seed=1)
    members = []
    for i in range(k):
        m = copy.deepcopy(parent)
        torch.manual_seed(10 + i)
        with torch.no_grad():
            m.fc.weight.add_(0.1 * torch.randn_like(m.fc.weight))
        members.append(m)
    return members


FAMILIES = {
    "full-resnet": lambda: [tiny_model("test_resnet", seed=s) for s in range(3)],
    "head-only": head_only_members,
    "mixed-arch": lambda: [
        tiny_model("test_resnet", seed=0),
        tiny_model("test_efficientnet", seed=1),
        tiny_model("test_vit", seed=2),
        tiny_model("test_resnet", seed=3),
    ],
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("strategy", ["loop", "vmap", "threads"])
def test_fused_equals_members_one_by_one(family, strategy):
    models = FAMILIES[family]()
    ens = Ensemble.from_models(models)
    fused = EnsembleModule(ens, strategy=strategy).eval()
    order = [int(n.split("-")[1]) for n in ens.member_names]  # groups may reorder members
    ref = member_logits([models[i] for i in order]).softmax(-1)
    with torch.no_grad():
        probs, members = fused(X, return_members=True)
    assert members.shape == (len(models), 4, 3)
    assert (members - ref).abs().max() <= 1e-5
    assert (probs - ref.mean(0)).abs().max() <= 1e-5


def test_head_only_group_stores_and_runs_trunk_once():
    models = head_only_members(4)
    ens = Ensemble.from_models(models)
    assert sorted(ens.groups[0].member_tensors) == ["fc.weight"]
    for strategy in ("loop", "vmap", "threads"):
        fused = EnsembleModule(ens, strategy=strategy).eval()
        convs = [m for m in fused.executors[0].net.model.modules() if isinstance(m, torch.nn.Conv2d)]
        calls = []
        for conv in (convs[0], convs[-1]):  # the first and the last convolution of the trunk
            conv.register_forward_hook(lambda *a: calls.append(1))
        with torch.no_grad():
            fused(X)
        assert len(calls) == 2, strategy
    # contrast: members that differ everywhere run the last convolution once each
    fused = EnsembleModule(Ensemble.from_models(FAMILIES["full-resnet"]()), strategy="loop").eval()
    calls = []
    for member in fused.executors[0].member_modules():
        convs = [m for m in member.modules() if isinstance(m, torch.nn.Conv2d)]
        convs[-1].register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        fused(X)
    assert len(calls) == 3


def test_threads_restore_torch_state_and_carry_the_callers_modes():
    ens = Ensemble.from_models(FAMILIES["full-resnet"]())
    auto, threads = EnsembleModule(ens).eval(), EnsembleModule(ens, strategy="threads").eval()
    assert auto._mode(auto.executors[0], X) == "threads"  # members differ in every block
    head = EnsembleModule(Ensemble.from_models(head_only_members(3))).eval()
    assert head._mode(head.executors[0], X) == "loop"  # only classifiers differ: nothing to spread
    before = torch.get_num_threads()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert threads(X, return_members=True)[1].dtype == EnsembleModule(ens, strategy="loop")(X, return_members=True)[1].dtype
    assert torch.get_num_threads() == before
    seen = []  # what the member threads run under (new threads start with grad on, inference mode off)
    for member in threads.executors[0].member_modules():
        member.register_forward_hook(lambda *a: seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled())))
    with torch.no_grad():
        threads(X)
    with torch.inference_mode():
        threads(X)
    assert seen == [(False, False)] * 3 + [(False, True)] * 3
    x = X.clone().requires_grad_(True)
    threads(x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_batchnorm_is_folded_into_convolutions_with_the_same_outputs():
    for family in ("full-resnet", "head-only", "mixed-arch"):  # BatchNorm2d, and timm's BatchNormAct2d
        ens = Ensemble.from_models(FAMILIES[family]())
        folded, plain = EnsembleModule(ens).eval(), EnsembleModule(ens, fold_bn=False).eval()
        for ex in folded.executors:  # BatchNormAct2d is a BatchNorm2d subclass: this covers both
            assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ex.net.modules())
        assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.executors[0].net.modules())
        assert folded.num_parameters() == plain.num_parameters()  # what is stored, not how it runs
        with torch.no_grad():
            assert (folded(X, return_members=True)[1] - plain(X, return_members=True)[1]).abs().max() <= 1e-5


def test_folding_never_moves_shared_convolutions_to_the_members():
    """Members that share every convolution and differ in one BatchNorm's statistics (a recalibrated
    block): that BatchNorm stays, its convolution stays shared, the other BatchNorms fold."""
    parent = tiny_model("test_resnet", seed=1)
    name = [n for n, m in parent.named_modules() if isinstance(m, torch.nn.BatchNorm2d)][-1]
    members = []
    for i in range(3):
        m = copy.deepcopy(parent)
        m.get_submodule(name).running_mean.add_(0.1 * (i + 1))
        members.append(m)
    fused = EnsembleModule(Ensemble.from_models(members)).eval()
    ex = fused.executors[0]
    assert ex.names == [f"model.{name}.running_mean"]
    assert [n for n, m in ex.net.model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)] == [name]
    with torch.no_grad():
        assert (fused(X, return_members=True)[1] - member_logits(members).softmax(-1)).abs().max() <= 1e-5


def test_round_trip_gives_identical_outputs(tmp_path):
    models = FAMILIES["mixed-arch"]()
    ens = Ensemble.from_models(models)
    before = EnsembleModule(ens).eval()
    posthoc.save(ens, tmp_path / "art", Provenance(config={"combine": "prob_mean"}, metrics={"val": {"top1": 50.0}}))
    after = posthoc.load(tmp_path / "art")
    with torch.no_grad():
        assert torch.equal(before(X), after(X))
    assert isinstance(after, torch.nn.Module) and not after.training
    assert after.pretrained_cfg["input_size"] == (3, 32, 32) or list(after.pretrained_cfg["input_size"]) == [3, 32, 32]
    cfg = read_config(tmp_path / "art")
    assert cfg["posthoc"]["format_version"] == 1 and cfg["num_members"] == 4
    assert {"posthoc_version", "torch_version", "timm_version"} <= set(cfg["posthoc"])
    assert cfg["groups"][0]["timm_config"]["pretrained_cfg"]["input_size"] == [3, 32, 32]
    card = (tmp_path / "art" / "README.md").read_text()
    assert "library_name: posthoc" in card and "posthoc.load" in card and "| val | 50" in card
    # the front matter is huggingface_hub's: its eval results parse back from the card
    from huggingface_hub import ModelCard

    results = ModelCard(card).data.eval_results
    assert [(r.dataset_split, r.metric_type, r.metric_value) for r in results] == [("val", "accuracy", 50.0)]


def test_shared_tensors_are_stored_once(tmp_path):
    from safetensors import safe_open

    ens = Ensemble.from_models(head_only_members(4))
    posthoc.save(ens, tmp_path / "a")
    with safe_open(str(tmp_path / "a" / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor("groups.0.members.fc.weight").shape[0] == 4
    assert sum(k.startswith("groups.0.members.") for k in keys) == 1
    assert "groups.0.shared.fc.bias" in keys


@pytest.mark.parametrize("rule", ["logit_mean", "vote", "prob_mean"])
def test_combine_rules_and_temperature(rule):
    models = FAMILIES["full-resnet"]()
    fused = EnsembleModule(Ensemble.from_models(models, combine=Combine(rule=rule, temperature=2.0))).eval()
    logits = member_logits(models) / 2.0
    expected = {
        "prob_mean": logits.softmax(-1).mean(0),
        "logit_mean": logits.mean(0).softmax(-1),
        "vote": torch.nn.functional.one_hot(logits.argmax(-1), 3).float().mean(0),
    }[rule]
    with torch.no_grad():
        assert (fused(X) - expected).abs().max() <= 1e-5


def test_coupling_initialised_from_heads_reproduces_logit_averaging():
    models = FAMILIES["full-resnet"]()
    k = len(models)
    weight = torch.cat([m.fc.weight.detach() for m in models], dim=1) / k
    bias = torch.stack([m.fc.bias.detach() for m in models]).mean(0)
    ens = Ensemble.from_models(models, combine=Combine(rule="coupling", coupling_weight=weight, coupling_bias=bias))
    with torch.no_grad():
        assert (EnsembleModule(ens)(X) - member_logits(models).mean(0).softmax(-1)).abs().max() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_close_to_float32(dtype):
    models = FAMILIES["full-resnet"]()
    fused = EnsembleModule(Ensemble.from_models(models)).eval()
    with torch.no_grad():
        ref = fused(X)
        low = copy.deepcopy(fused).to(dtype)(X.to(dtype))
    assert low.dtype == dtype
    assert (low.float() - ref).abs().max() < 0.05


def test_interrupted_save_leaves_no_artifact(tmp_path, monkeypatch):
    import posthoc.artifact

    def boom(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(posthoc.artifact, "render_card", boom)
    with pytest.raises(KeyboardInterrupt):
        posthoc.save(Ensemble.from_models(head_only_members(2)), tmp_path / "art")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten_by_default(tmp_path):
    ens = Ensemble.from_models(head_only_members(2))
    posthoc.save(ens, tmp_path / "art")
    with pytest.raises(PosthocError, match="already exists; pass --overwrite"):
        posthoc.save(ens, tmp_path / "art")
    posthoc.save(ens, tmp_path / "art", overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


@pytest.mark.parametrize(
    "damage, message",
    [
        ("flip", "does not match the SHA-256"),
        ("truncate", "is truncated or was replaced"),
        ("config", "not valid JSON"),
        ("weights", "has no model.safetensors"),
        ("version", "newer than this posthoc reads"),
    ],
)
def test_damaged_artifact_fails_with_one_line(tmp_path, capsys, image_data, damage, message):
    art = tmp_path / "art"
    posthoc.save(Ensemble.from_models(head_only_members(2)), art)
    weights = art / "model.safetensors"
    if damage == "flip":
        data = bytearray(weights.read_bytes())
        data[-10] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "config":
        (art / "config.json").write_text('{"posthoc": ')
    elif damage == "weights":
        weights.unlink()
    else:
        cfg = json.loads((art / "config.json").read_text())
        cfg["posthoc"]["format_version"] = 99
        (art / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PosthocError, match=message):
        posthoc.load(art)
    code = main(
        [
            "eval",
            str(art),
            "--data",
            str(image_data),
            *QUIET,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and message.split()[0] in err


def test_cli_ensemble_info_eval(tmp_path, capsys, image_data):
    dirs = [save_hub_layout(tiny_model("test_resnet", seed=s), tmp_path / f"m{s}") for s in range(3)]
    out = tmp_path / "deep3"
    assert main(["ensemble", *map(str, dirs), "--out", str(out)]) == 0
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "members" in info and "m0, m1, m2" in info and "size on disk" in info
    assert (
        main(
            [
                "eval",
                str(out),
                "--data",
                str(image_data),
                *QUIET,
                "--results-file",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["members"] == 3 and 0 <= result["disagreement"] <= 100 and "member_top1" in result


def test_cli_ensemble_rejects_mixed_label_spaces(tmp_path, capsys):
    a = save_hub_layout(tiny_model("test_resnet", num_classes=3), tmp_path / "a")
    b = save_hub_layout(tiny_model("test_resnet", num_classes=5), tmp_path / "b")
    assert main(["ensemble", str(a), str(b), "--out", str(tmp_path / "o")]) == 2
    assert "predicts 5 classes but" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_overwrite_never_replaces_a_non_artifact(tmp_path):
    precious = tmp_path / "runs"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(PosthocError, match="replaces artifacts only"):
        posthoc.save(Ensemble.from_models(head_only_members(2)), precious, overwrite=True)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_coupling_width_comes_from_the_classifier_not_num_features():
    import timm

    models = [
        timm.create_model("mobilenetv3_small_050", num_classes=3, pretrained_cfg_overlay=dict(input_size=(3, 32, 32))).eval()
        for _ in range(2)
    ]
    heads = [m.get_classifier() for m in models]
    assert heads[0].in_features != models[0].num_features  # MobileNetV3 has a head hidden layer
    weight = torch.cat([h.weight.detach() for h in heads], dim=1) / 2
    bias = torch.stack([h.bias.detach() for h in heads]).mean(0)
    ens = Ensemble.from_models(models, combine=Combine(rule="coupling", coupling_weight=weight, coupling_bias=bias))
    with torch.no_grad():
        expected = member_logits(models).mean(0).softmax(-1)
        assert (EnsembleModule(ens)(X) - expected).abs().max() <= 1e-5


def test_error_messages_keep_brackets(tmp_path, capsys):
    code = main(["eval", str(tmp_path / "[v2]" / "w.pth"), "--arch", "test_resnet", "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "[v2]" in err and "Traceback" not in err
