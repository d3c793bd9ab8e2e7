"""``supernet`` and ``lastlayer``: coupling init = logit averaging, frozen parts stay frozen, the feature
cache trains the same layers as streaming, layer counting, temperature, determinism, data hygiene."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import posthoc
from posthoc import PosthocError
from posthoc.artifact import read
from posthoc.cli import main
from posthoc.data import ImageSet
from posthoc.graph import Cut
from posthoc.methods._coupling import coupling_init
from posthoc.methods._layerwise import Retrainer
from posthoc.metrics import fit_temperature
from posthoc.timm_io import last_layers as layer_units

from .helpers import QUIET, TINY, assert_same_artifact, run_boost, save_hub_layout, tiny_model

X = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
FAST = TINY["lastlayer"]  # both methods
FAST_SN = TINY["supernet"]


@pytest.fixture(scope="module")
def parent_dirs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("parents")
    return [save_hub_layout(tiny_model("test_resnet", seed=s), root / f"p{s}") for s in range(3)]


def _logits(models, x=X):
    with torch.no_grad():
        return torch.stack([m.eval()(x) for m in models])


# ------------------------------------------------------------------------------------ coupling init
def test_coupling_init_with_divisor_k_is_exactly_logit_averaging():
    models = [tiny_model("test_resnet", seed=s) for s in range(3)]
    weight, bias = coupling_init([m.get_classifier() for m in models], divisor=3)
    with torch.no_grad():
        feats = [m.forward_head(m.forward_features(X), pre_logits=True) for m in models]
        coupled = torch.cat(feats, dim=1) @ weight.T + bias
    assert (coupled - _logits(models).mean(0)).abs().max() <= 1e-5
    # divisor 1 is the thesis's "copied, not scaled": the sum of the member logits (plus the mean bias)
    w1, _ = coupling_init([m.get_classifier() for m in models], divisor=1)
    assert torch.allclose(w1, 3 * weight)


def test_untrained_supernet_artifact_equals_logit_mean_of_parents(tmp_path, parent_dirs, image_data):
    summary = run_boost(parent_dirs, "supernet", image_data, tmp_path / "sn", coupling_epochs=0, temperature_scaling=False)
    assert summary["members"] == 3
    loaded = posthoc.load(tmp_path / "sn")
    parents = [posthoc.load_model(str(d)) for d in parent_dirs]
    with torch.no_grad():
        assert (loaded(X) - _logits(parents).mean(0).softmax(-1)).abs().max() <= 1e-5
    cfg = json.loads((tmp_path / "sn" / "config.json").read_text())
    assert cfg["combine"]["rule"] == "coupling"
    measured = cfg["method"]["measured"]
    assert measured["coupling"]["divisor"] == 3.0 and measured["coupling"]["best_epoch"] == 0


def test_coupling_columns_follow_member_order_across_architectures(tmp_path, parent_dirs, image_data):
    eff = save_hub_layout(tiny_model("test_efficientnet", seed=5), tmp_path / "eff")
    specs = [parent_dirs[0], eff, parent_dirs[1]]  # the artifact groups members by architecture: p0, p1, eff
    run_boost(specs, "supernet", image_data, tmp_path / "sn", coupling_epochs=0, temperature_scaling=False)
    ens, _ = read(tmp_path / "sn")
    assert ens.member_names == ["p0", "p1", "eff"]
    parents = [posthoc.load_model(str(d)) for d in specs]
    with torch.no_grad():
        assert (posthoc.load(tmp_path / "sn")(X) - _logits(parents).mean(0).softmax(-1)).abs().max() <= 1e-5


def test_trained_coupling_is_kept_only_if_it_improves_select_nll(tmp_path, parent_dirs, image_data):
    run_boost(parent_dirs[:2], "supernet", image_data, tmp_path / "sn", coupling_epochs=4, batch_size=16, coupling_lr=0.01)
    cfg = json.loads((tmp_path / "sn" / "config.json").read_text())
    measured = cfg["method"]["measured"]
    history = measured["coupling"]["select"]
    best = measured["coupling"]["best_epoch"]
    # with temperature scaling on, epochs are compared after fitting each its own temperature
    assert len(history) == 5 and history[best]["nll_t"] == min(h["nll_t"] for h in history)
    assert history[best]["nll_t"] < history[0]["nll_t"]  # these random parents leave room to learn
    assert measured["temperature"]["select_after"]["nll"] == pytest.approx(history[best]["nll_t"], abs=1e-4)
    assert measured["temperature"]["select_after"]["nll"] <= history[best]["nll"] + 1e-6
    assert cfg["combine"]["temperature"] == pytest.approx(measured["temperature"]["temperature"], rel=1e-4)
    # the build-time metric of the artifact is the coupled, temperature-scaled prediction
    assert cfg["metrics"]["val:select"]["nll"] == pytest.approx(measured["temperature"]["select_after"]["nll"], abs=1e-4)


# ------------------------------------------------------------------------------------ frozen parts
@pytest.mark.parametrize("train_bn", [False, True])
def test_frozen_parts_stay_frozen(tmp_path, parent_dirs, image_data, train_bn):
    run_boost(parent_dirs[:1], "lastlayer", image_data, tmp_path / "ll", last_layers=2, train_bn=train_bn, **FAST)
    ens, _ = read(tmp_path / "ll")
    before = posthoc.load_model(str(parent_dirs[0])).state_dict()
    after = ens.members()[0].state_dict()
    retrained = [n for u in layer_units(tiny_model("test_resnet"), 2) for n in u]
    assert retrained[:2] == ["fc.weight", "fc.bias"] and all(n.startswith("layer4.") for n in retrained[2:])
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    owners = {n.rsplit(".", 1)[0] for n in retrained}
    frozen = [n for n in before if n.rsplit(".", 1)[0] not in owners]
    assert frozen and not changed & set(frozen)  # stem, layer1-3: bitwise identical, BN statistics included
    assert "fc.weight" in changed and any(n.startswith("layer4.") and n in retrained for n in changed)
    stats = {n for n in changed if n.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    assert bool(stats) == train_bn  # eval-mode BN in the retrained block keeps its statistics


def test_copies_of_one_parent_share_the_trunk_and_differ_in_retrained_layers(tmp_path, parent_dirs, image_data):
    run_boost(parent_dirs[:1], "supernet", image_data, tmp_path / "sn", copies=3, bootstrap=True, **FAST_SN)
    ens, _cfg = read(tmp_path / "sn")
    group = ens.groups[0]
    assert group.member_names == ["p0/0", "p0/1", "p0/2"]
    assert group.member_tensors and all(n.startswith(("layer4.", "fc.")) for n in group.member_tensors)
    w = group.member_tensors["layer4.0.conv1.weight"]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    parent = posthoc.load_model(str(parent_dirs[0])).state_dict()
    assert all(torch.equal(t, parent[n]) for n, t in group.shared.items() if not n.startswith(("layer4.", "fc.")))
    assert ens.combine.coupling_weight.shape == (3, 3 * 96)


# ------------------------------------------------------------------------------------ feature cache
@pytest.mark.parametrize("layers", [1, 2])
def test_feature_cache_trains_the_same_layers_as_streaming(tmp_path, parent_dirs, image_data, layers):
    common = dict(last_layers=layers, seed=3, cache_augment="none", augment="none", **FAST)
    run_boost(parent_dirs[:1], "lastlayer", image_data, tmp_path / "cached", feature_cache=True, **common)
    run_boost(parent_dirs[:1], "lastlayer", image_data, tmp_path / "streamed", feature_cache=False, **common)
    cached, streamed = (read(tmp_path / d)[0].members()[0].state_dict() for d in ("cached", "streamed"))
    parent = posthoc.load_model(str(parent_dirs[0])).state_dict()
    assert not torch.equal(cached["fc.weight"], parent["fc.weight"])
    for name in cached:
        assert torch.allclose(cached[name].float(), streamed[name].float(), atol=1e-4, rtol=1e-4), name
    # another seed (another data order) trains a visibly different head: the comparison can fail
    run_boost(parent_dirs[:1], "lastlayer", image_data, tmp_path / "other", feature_cache=True, **{**common, "seed": 4})
    other = read(tmp_path / "other")[0].members()[0].state_dict()
    assert not torch.allclose(cached["fc.weight"], other["fc.weight"], atol=1e-4, rtol=1e-4)


def test_cut_reproduces_the_whole_network():
    model = tiny_model("test_resnet", seed=2)
    r = Retrainer(model, 2)
    with torch.no_grad():
        feats, logits = r.base.outputs(r.base.inputs(X))
        assert torch.allclose(logits, model(X), atol=1e-5)
        assert torch.allclose(feats, model.forward_head(model.forward_features(X), pre_logits=True), atol=1e-5)
        stage = r.stage_cut(1)  # the classifier stage inside the base cut's rest
        entries = stage.inputs(*r.base.boundary(r.base.inputs(X)))
        assert [tuple(t.shape) for t in entries] == [(6, 96)]
        assert torch.allclose(stage.outputs(entries)[1], model(X), atol=1e-5)
    assert isinstance(r.base, Cut) and r.stage_cut(2) is None


def test_layer_units_count_classifier_then_blocks_last_first():
    model = tiny_model("test_resnet")
    units = layer_units(model, 4)
    assert units[0] == ["fc.weight", "fc.bias"]
    assert [u[0].split(".")[0] for u in units[1:]] == ["layer4", "layer3", "layer2"]
    with pytest.raises(PosthocError, match="more than this model has"):
        layer_units(model, 6)


# ------------------------------------------------------------------------------------ calibration
def test_fit_temperature_recovers_a_known_temperature():
    gen = torch.Generator().manual_seed(0)
    z = 2.0 * torch.randn(4000, 5, generator=gen)
    y = torch.multinomial(z.softmax(-1), 1, generator=gen).squeeze(1)
    t = fit_temperature(3.0 * z, y)
    assert abs(t - 3.0) < 0.25
    assert abs(fit_temperature(z, y) - 1.0) < 0.1


# ------------------------------------------------------------------------------------ hygiene, CLI
def test_same_seed_gives_bit_identical_artifact(tmp_path, parent_dirs, image_data):
    kw = dict(copies=2, **FAST_SN)
    run_boost(parent_dirs[:1], "supernet", image_data, tmp_path / "a", seed=5, **kw)
    run_boost(parent_dirs[:1], "supernet", image_data, tmp_path / "b", seed=5, **kw)
    assert_same_artifact(tmp_path / "a", tmp_path / "b")


def test_training_never_reads_report_images(tmp_path, monkeypatch, parent_dirs, image_data):
    from posthoc.data import open_split

    val = open_split(image_data, "val")
    report = {
        Path(val.samples[i][0]).name + Path(val.samples[i][0]).parent.name for i in open_split(image_data, "val:report").indices
    }
    seen = []
    original = ImageSet.__getitem__

    def spy(self, index):
        seen.append(Path(self.source.describe(index)))
        return original(self, index)

    monkeypatch.setattr(ImageSet, "__getitem__", spy)
    run_boost(parent_dirs[:1], "supernet", image_data, tmp_path / "a", copies=2, **FAST_SN)
    val_seen = {p.name + p.parent.name for p in seen if p.parent.parent.name == "val"}
    assert val_seen and not (val_seen & report)


def test_cli_supernet_from_several_checkpoints(tmp_path, capsys, parent_dirs, image_data):
    out = tmp_path / "sn"
    code = main(
        [
            "boost",
            *map(str, parent_dirs[:2]),
            "--method",
            "supernet",
            "--data",
            str(image_data),
            "--out",
            str(out),
            *QUIET,
            "--coupling-divisor",
            "4",
            "--l2",
            "0.001",
            "--coupling-epochs",
            "1",
            "--no-temperature-scaling",
        ]
    )
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["method"]["config"]["coupling_divisor"] == 4.0 and cfg["method"]["config"]["l2"] == 0.001
    assert cfg["num_members"] == 2 and cfg["combine"]["rule"] == "coupling" and cfg["combine"]["temperature"] == 1.0
    assert cfg["combine"]["views"] == cfg["method"]["measured"]["views"]["chosen"]["views"]  # chosen on the select part
    assert cfg["method"]["include_parent"] is False
    assert main(["methods", "supernet"]) == 0
    assert "--last-layers" in capsys.readouterr().out


@pytest.mark.parametrize(
    "method, flags, message",
    [
        ("supernet", ["--copies", "3", "--last-layers", "1"], "use --last-layers 2 or more"),
        ("supernet", ["--last-layers", "1"], "or --copies 1"),
        ("supernet", ["--retrain-layers", "1"], "--retrain-layers is deprecated"),
        ("supernet", ["--coupling-optimizer", "rmsprop"], "must be one of sgd, adam, got 'rmsprop'"),
        ("supernet", ["--coupling-divisor", "0"], "--coupling-divisor must be more than 0"),
        ("supernet", ["--scale", "0"], "--scale is deprecated and goes away in the next release; use --coupling-divisor"),
        ("lastlayer", ["--last-layers", "0"], "--last-layers must be at least 1"),
        ("lastlayer", ["--last-layers", "9"], "--last-layers 9 is more than this model has"),
        ("lastlayer", ["--train-bn", "yes"], "looks like a value for an on/off option"),
        ("lastlayer", ["--bn", "train", "--last-layers", "0"], "--last-layers must be at least 1"),
        ("lastlayer", ["--no-feature-cache", "--bootstrap"], "--bootstrap needs the feature cache"),
    ],
)
def test_cli_flag_errors(tmp_path, capsys, parent_dirs, image_data, method, flags, message):
    code = main(
        [
            "boost",
            str(parent_dirs[0]),
            "--method",
            method,
            "--data",
            str(image_data),
            "--out",
            str(tmp_path / "x"),
            *QUIET,
            *flags,
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_lastlayer_takes_one_parent(tmp_path, parent_dirs, image_data):
    with pytest.raises(PosthocError, match="takes 1 model"):
        run_boost(parent_dirs[:2], "lastlayer", image_data, tmp_path / "x")
