"""``sparse``: partitioned masks, pruned weights that stay zero, annealing that never writes a sampled
mask, determinism, data hygiene, and the dense ablation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posthoc import PosthocError
from posthoc.artifact import read
from posthoc.cli import main
from posthoc.data import ImageSet
from posthoc.methods._children import LABEL_SMOOTHING, PAD_FRACTION, Annealer, ChildDraw, Masked, child_seed, draw_child
from posthoc.methods.sparse import SparseConfig, group_masks, prunable_tensors
from posthoc.options import make_config

from .helpers import QUIET, assert_same_artifact, run_boost, tiny_model


@pytest.mark.parametrize("partition", [2, 3])
def test_partitioned_masks_are_disjoint_and_cover_every_weight(partition):
    parent = tiny_model("test_resnet")
    cfg = make_config(SparseConfig, {"keep": 1 / partition, "partition": partition, "members": 2 * partition})
    names = prunable_tensors(parent, cfg)
    for group in range(2):
        siblings = group_masks(parent, names, cfg, group)
        assert len(siblings) == partition
        for name in names:
            stacked = torch.stack([s.mask[name].long() for s in siblings])
            assert torch.equal(stacked.sum(0), torch.ones_like(stacked[0]))  # exactly one sibling holds each weight
            share = stacked.float().mean(dim=tuple(range(1, stacked.dim())))
            if stacked[0].numel() >= 200:
                assert (share - 1 / partition).abs().max() < 0.1
    a, b = (group_masks(parent, names, cfg, g)[0].mask[names[1]] for g in (0, 1))
    assert not torch.equal(a, b)  # groups are independent draws


def test_channel_structure_prunes_whole_output_channels():
    parent = tiny_model("test_resnet")
    cfg = make_config(SparseConfig, {"structure": "channel"})
    names = prunable_tensors(parent, cfg)
    for name in names:
        mask = group_masks(parent, names, cfg, 0)[0].mask[name]
        rows = mask.flatten(1)
        assert torch.equal(rows.all(1), rows.any(1))  # every output channel is kept or pruned as a whole


def test_first_conv_and_classifier_options():
    parent = tiny_model("test_resnet")
    default = prunable_tensors(parent, make_config(SparseConfig, {}))
    first = next(n for n, _ in parent.named_parameters() if n.endswith("weight"))  # test_resnet's deep stem: conv1.0
    assert first not in default and "fc.weight" in default
    assert first in prunable_tensors(parent, make_config(SparseConfig, {"prune_first_conv": True}))
    assert "fc.weight" not in prunable_tensors(parent, make_config(SparseConfig, {"prune_classifier": False}))
    assert set(prunable_tensors(parent, make_config(SparseConfig, {"last_layers": 2}))) < set(default)


def test_pruned_weights_stay_exactly_zero_after_tuning_with_momentum_and_weight_decay(tmp_path, resnet_dir, image_data):
    run_boost(resnet_dir, "sparse", image_data, tmp_path / "a", members=2, keep=0.5, weight_decay=5e-3, max_lr=0.2)
    ens, config = read(tmp_path / "a")
    parent = tiny_model("test_resnet")  # the fixture's parent (seed 0)
    cfg = make_config(SparseConfig, {**config["method"]["config"]})
    names = prunable_tensors(parent, cfg)
    siblings = group_masks(parent, names, cfg, 0)
    for k, sibling in enumerate(siblings):
        member = ens.groups[0].member_state_dict(k)
        for name in names:
            weight = member[name]
            assert torch.count_nonzero(weight[~sibling.mask[name]]) == 0, name
            assert torch.count_nonzero(weight[sibling.mask[name]]) == int(sibling.mask[name].sum()), name
            assert not torch.equal(weight[sibling.mask[name]], parent.get_parameter(name).detach()[sibling.mask[name]])


def test_a_sampled_mask_never_reaches_the_stored_weights():
    import torch.nn.utils.parametrize as P

    layer = torch.nn.Linear(6, 4)
    before = layer.weight.detach().clone()
    sample = torch.rand(4, 6, generator=torch.Generator().manual_seed(0)) < 0.5
    P.register_parametrization(layer, "weight", Masked(sample))
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        layer(torch.randn(8, 6)).square().sum().backward()
        opt.step()
    stored = layer.parametrizations.weight.original.detach()
    assert torch.equal(stored[~sample], before[~sample])  # hidden weights: not zeroed, not trained
    assert not torch.equal(stored[sample], before[sample])
    assert torch.equal(layer.weight[~sample], torch.zeros(int((~sample).sum())))


def test_annealed_children_end_exactly_pruned(tmp_path, resnet_dir, image_data):
    run_boost(
        resnet_dir, "sparse", image_data, tmp_path / "a", members=2, keep=0.5, anneal="temperature", tau0=0.9, anneal_epochs=0.4
    )
    ens, config = read(tmp_path / "a")
    parent = tiny_model("test_resnet")
    cfg = make_config(SparseConfig, dict(config["method"]["config"]))
    names = prunable_tensors(parent, cfg)
    for k, sibling in enumerate(group_masks(parent, names, cfg, 0)):
        member = ens.groups[0].member_state_dict(k)
        for name in names:
            assert torch.count_nonzero(member[name][~sibling.mask[name]]) == 0
            assert torch.count_nonzero(member[name][sibling.mask[name]]) == int(sibling.mask[name].sum())


def test_annealing_probabilities_reach_the_mask():
    parent = tiny_model("test_resnet")
    cfg = make_config(SparseConfig, {"anneal": "temperature", "tau0": 0.5})
    names = prunable_tensors(parent, cfg)
    child = group_masks(parent, names, cfg, 0)[1]
    params = {n: Masked(child.mask[n]) for n in names}
    annealer = Annealer(child, params, cfg, steps=10, seed=0)
    start, end = annealer.probability(names[0], 0), annealer.probability(names[0], 10)
    mask = child.mask[names[0]].float()
    assert torch.equal(start, mask + (1 - mask) * 0.5) and torch.equal(end, mask)
    annealer.draw(10)
    assert all(torch.equal(params[n].mask, child.mask[n].float()) for n in names)
    random_cfg = make_config(SparseConfig, {"anneal": "random"})
    r = Annealer(child, params, random_cfg, steps=4, seed=0)
    assert torch.equal(r.probability(names[0], 4), mask) and torch.equal(
        r.probability(names[0], 0), child.score[names[0]].float()
    )


def test_same_seed_gives_bit_identical_artifact(tmp_path, resnet_dir, image_data):
    for d, seed in (("a", 5), ("b", 5), ("c", 6)):
        run_boost(resnet_dir, "sparse", image_data, tmp_path / d, members=2, keep=0.5, seed=seed, bootstrap=True)
    assert_same_artifact(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()


def test_tuning_never_reads_report_images(tmp_path, monkeypatch, resnet_dir, image_data):
    from posthoc.data import open_split

    report = {
        Path(p).name + Path(p).parent.name
        for p, _ in (open_split(image_data, "val").samples[i] for i in open_split(image_data, "val:report").indices)
    }
    seen = []
    original = ImageSet.__getitem__

    def spy(self, index):
        seen.append(Path(self.source.describe(index)))
        return original(self, index)

    monkeypatch.setattr(ImageSet, "__getitem__", spy)
    run_boost(resnet_dir, "sparse", image_data, tmp_path / "a", members=2)
    val_seen = {p.name + p.parent.name for p in seen if p.parent.parent.name == "val"}
    assert val_seen and not (val_seen & report)


def test_keep_one_prunes_nothing_and_children_still_differ(tmp_path, resnet_dir, image_data):
    summary = run_boost(resnet_dir, "sparse", image_data, tmp_path / "a", members=3, keep=1.0, include_parent=True)
    assert summary["members"] == 3 and summary["notes"]["masks"]["tensors"] == 0 and summary["notes"]["masks"]["partition"] == 1
    ens, config = read(tmp_path / "a")
    assert ens.member_names == ["parent", "child-0", "child-1"] and config["method"]["include_parent"]
    parent = tiny_model("test_resnet")
    for k in (1, 2):
        member = ens.groups[0].member_state_dict(k)
        for name, p in parent.named_parameters():
            if p.dim() > 1:
                assert torch.count_nonzero(member[name]) == torch.count_nonzero(p)
    assert not torch.equal(ens.groups[0].member_state_dict(1)["fc.weight"], ens.groups[0].member_state_dict(2)["fc.weight"])


def test_coupled_children(tmp_path, resnet_dir, image_data):
    summary = run_boost(resnet_dir, "sparse", image_data, tmp_path / "a", members=2, couple=True, coupling_epochs=1)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["combine"]["rule"] == "coupling" and summary["members"] == 2
    assert "coupling" in config["method"]["measured"] and config["method"]["measured"]["budget_parent_epochs"] == 1.0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--keep", "0.4", "--partition", "2"], "--keep must be 0.5"),
        (["--keep", "1.0", "--anneal", "temperature"], "--keep 1.0 prunes none"),
        (["--keep", "0"], "--keep must be more than 0"),
        (["--members", "1", "--include-parent"], "leaves no child"),
        (["--mask-source", "l1", "--partition", "2"], "cannot be partitioned"),
        (["--schedule", "cyclic"], "must be one of onecycle, constant, trajectory, got 'cyclic'"),
        (["--child-diversity", "random"], "must be one of none, hyper, classweights, got 'random'"),
        (["--class-weight-concentration", "0"], "--class-weight-concentration must be more than 0"),
        (["--class-weight-concentration", "5"], "shapes --child-diversity classweights"),
        (["--schedule", "trajectory", "--keep", "0.5"], "--schedule trajectory chains dense children"),
        (["--schedule", "trajectory", "--anneal", "temperature"], "it cannot prune (--keep 0.5)"),
        (["--optimizer", "adam"], "must be one of auto, sgd, adamw, got 'adam'"),
        (["--max-lr", "0"], "--max-lr must be more than 0"),
        (["--weight-decay", "-1"], "--weight-decay must be at least 0"),
    ],
)
def test_cli_flag_errors(tmp_path, capsys, resnet_dir, image_data, flags, message):
    code = main(["boost", str(resnet_dir), "--method", "sparse", "--data", str(image_data), "--out", str(tmp_path / "x"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_budget_is_printed_before_training(tmp_path, capsys, resnet_dir, image_data):
    code = main(
        [
            "boost",
            str(resnet_dir),
            "--method",
            "sparse",
            "--data",
            str(image_data),
            "--out",
            str(tmp_path / "a"),
            *QUIET,
            "--members",
            "2",
            "--no-include-parent",
            "--child-epochs",
            "0.5",
            "--batch-size",
            "16",
            "--bn-batches",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert out.index("training budget: 2 children x 0.5 epochs = 1 parent-epochs") < out.index("child-0: select top-1")


def test_defaults_are_dense_children_with_the_parent_and_pruning_options_imply_half():
    default = make_config(SparseConfig, {})
    assert (default.keep, default.children, default.include_parent, default.parent_epochs) == (
        1.0,
        1,
        True,
        4.0,
    )  # parent + one child x 4 epochs (sparse_sweep_35ep.md)
    for given in ({"anneal": "temperature"}, {"partition": 2}, {"structure": "channel"}, {"mask_source": "l1", "partition": 1}):
        assert make_config(SparseConfig, given).keep == 0.5, given
    assert make_config(SparseConfig, {"keep": 0.8, "anneal": "random"}).keep == 0.8  # given: never changed
    assert make_config(SparseConfig, {"couple": True}).include_parent is False
    assert make_config(SparseConfig, {"include_parent": True}).siblings == 1
    assert (default.optimizer, default.max_lr, default.weight_decay, default.child_diversity) == ("auto", None, None, "none")


def test_pruned_children_and_the_parent_make_one_group(tmp_path, resnet_dir, image_data):
    """Children whose masks were removed list their weights in another order than the parent."""
    summary = run_boost(resnet_dir, "sparse", image_data, tmp_path / "a", members=3, keep=0.5, include_parent=True)
    ens, _ = read(tmp_path / "a")
    assert summary["members"] == 3 and ens.member_names[0] == "parent" and len(ens.groups) == 1


def test_unknown_option_for_sparse():
    with pytest.raises(PosthocError, match="unknown option --density"):
        make_config(SparseConfig, {"density": 0.5})


def test_children_train_under_bfloat16_autocast_on_cpu(tmp_path, resnet_dir, image_data):
    summary = run_boost(resnet_dir, "sparse", image_data, tmp_path / "a", members=2, amp=True)
    assert summary["members"] == 2 and all(c["steps"] > 0 for c in summary["notes"]["children"].values())


# ------------------------------------------------------------------------------------ children's diversity
def _measured(out: Path) -> dict:
    return json.loads((out / "config.json").read_text())["method"]["measured"]


def test_hyper_children_draw_their_own_hyper_parameters(tmp_path, resnet_dir, image_data):
    run_boost(resnet_dir, "sparse", image_data, tmp_path / "a", members=2, child_diversity="hyper")
    measured = _measured(tmp_path / "a")
    draws = [measured["children"][f"child-{i}"]["draw"] for i in range(2)]
    assert draws[0]["label_smoothing"] != draws[1]["label_smoothing"]
    assert draws[0]["weight_decay"] != draws[1]["weight_decay"]
    for draw in draws:
        assert LABEL_SMOOTHING[0] <= draw["label_smoothing"] <= LABEL_SMOOTHING[1]
        assert 1e-4 <= draw["weight_decay"] <= 1e-3  # x [0.2, 2] around SGD's 5e-4
        family, _, fraction = draw["augment"].partition(":")
        assert family == "light" and PAD_FRACTION[0] <= float(fraction) <= PAD_FRACTION[1]
    assert measured["diversity"]["kind"] == "hyper" and measured["diversity"]["ranges"]["label_smoothing"]["uniform"] == [
        0.0,
        0.2,
    ]
    assert measured["optimizer"]["optimizer"] == "sgd" and measured["optimizer"]["weight_decay"] == 5e-4


def test_a_childs_draw_depends_on_the_seed_and_its_index_alone():
    two, three = (make_config(SparseConfig, {"members": m, "child_diversity": "hyper"}) for m in (2, 3))
    draw = lambda cfg, i, **kw: draw_child(
        "hyper", child_seed(cfg, i), **{"weight_decay": 5e-4, "augment": "timm", "num_classes": 3, "concentration": 1, **kw}
    )
    assert draw(two, 1) == draw(three, 1) != draw(three, 2)
    scale = float(draw(two, 1).augment.partition("timm:")[2])
    assert 0.08 <= scale <= 0.5  # timm's smallest crop area, drawn
    plain = draw(two, 1, weight_decay=0.0, augment="none")  # no weight decay stays none, no augmentation stays none
    assert (plain.weight_decay, plain.augment, plain.label_smoothing) == (0.0, "none", draw(two, 1).label_smoothing)


def test_class_weighted_children_record_different_weights_of_mean_one(tmp_path, resnet_dir, image_data):
    run_boost(
        resnet_dir,
        "sparse",
        image_data,
        tmp_path / "a",
        members=2,
        child_diversity="classweights",
        class_weight_concentration=2.0,
    )
    measured = _measured(tmp_path / "a")
    weights = [measured["children"][f"child-{i}"]["draw"]["class_weights"] for i in range(2)]
    assert weights[0] != weights[1] and all(len(w) == 3 and min(w) > 0 for w in weights)
    assert all(abs(sum(w) / 3 - 1) < 1e-3 for w in weights)
    assert measured["diversity"] == {"kind": "classweights", "class_weights": "C x Dirichlet(2)"}


def test_a_draw_is_the_loss_the_engine_trains_with():
    logits, y = torch.randn(8, 3, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 0])
    draw = ChildDraw(label_smoothing=0.1, class_weights=(0.5, 1.0, 1.5))
    expected = torch.nn.functional.cross_entropy(logits, y, weight=torch.tensor([0.5, 1.0, 1.5]), label_smoothing=0.1)
    assert torch.equal(draw.loss()(logits, y, None), expected)
    assert ChildDraw().loss() is None  # no diversity: the engine's own cross-entropy


@pytest.mark.parametrize("diversity, schedule", [("hyper", "onecycle"), ("classweights", "trajectory")])
def test_diverse_children_same_seed_same_bytes(tmp_path, resnet_dir, image_data, diversity, schedule):
    for d, seed in (("a", 5), ("b", 5), ("c", 6)):
        run_boost(
            resnet_dir, "sparse", image_data, tmp_path / d, members=2, seed=seed, child_diversity=diversity, schedule=schedule
        )
    assert_same_artifact(tmp_path / "a", tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()


# ------------------------------------------------------------------------------------ the trajectory
def _members(out: Path) -> list[dict[str, torch.Tensor]]:
    ens, _ = read(out)
    return [ens.groups[0].member_state_dict(k) for k in range(ens.num_members)]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trajectory_members_are_the_cycle_ends(tmp_path, resnet_dir, image_data):
    summary = run_boost(resnet_dir, "sparse", image_data, tmp_path / "t2", members=2, schedule="trajectory")
    run_boost(resnet_dir, "sparse", image_data, tmp_path / "t3", members=3, schedule="trajectory")
    run_boost(resnet_dir, "sparse", image_data, tmp_path / "t1", members=1, schedule="trajectory")
    run_boost(resnet_dir, "sparse", image_data, tmp_path / "c1", members=1)
    run_boost(resnet_dir, "sparse", image_data, tmp_path / "c2", members=2)
    t2, t3, t1, c1, c2 = (_members(tmp_path / d) for d in ("t2", "t3", "t1", "c1", "c2"))
    assert (
        read(tmp_path / "t2")[0].member_names == ["cycle-0", "cycle-1"] and summary["notes"]["children"]["cycle-1"]["steps"] == 4
    )
    assert _same(t1[0], c1[0])  # one cycle is the independent child 0 with the same seed
    assert _same(t2[0], c2[0]) and not _same(t2[1], t2[0])  # cycle 2 moved on from cycle 1's end
    assert not _same(t2[1], c2[1])  # ... which the independent child 1 never started from
    assert _same(t3[0], t2[0]) and _same(t3[1], t2[1]) and not _same(t3[2], t3[1])  # cycles do not depend on how many follow


def test_trajectory_re_estimates_batchnorm_per_member(tmp_path, resnet_dir, image_data):
    run_boost(resnet_dir, "sparse", image_data, tmp_path / "a", members=2, schedule="trajectory", bn_batches=0)
    run_boost(resnet_dir, "sparse", image_data, tmp_path / "b", members=2, schedule="trajectory", bn_batches=1)
    kept, estimated = _members(tmp_path / "a"), _members(tmp_path / "b")
    stats = [k for k in kept[0] if k.endswith("running_var")]
    for k in (0, 1):  # the same weights; only the statistics differ
        assert all(torch.equal(kept[k][n], estimated[k][n]) for n in kept[k] if "running" not in n and "num_batches" not in n)
        assert not torch.equal(kept[k][stats[0]], estimated[k][stats[0]])


# ------------------------------------------------------------------------------------ 2x configurations
def test_the_parent_and_one_child(tmp_path, resnet_dir, image_data):
    summary = run_boost(resnet_dir, "sparse", image_data, tmp_path / "a", members=2, include_parent=True)
    ens, config = read(tmp_path / "a")
    assert ens.member_names == ["parent", "child-0"] and config["method"]["include_parent"]
    assert abs(summary["cost"]["flops_ratio"] - 2) < 1e-6
    assert _same(ens.groups[0].member_state_dict(0), tiny_model("test_resnet").state_dict())


def test_train_longer_is_the_parent_fine_tuned_as_one_network(tmp_path, resnet_dir, image_data):
    """The benchmark's "train longer" peer: ``--members 1 --no-include-parent --child-epochs N``."""
    summary = run_boost(resnet_dir, "sparse", image_data, tmp_path / "a", members=1, child_epochs=2)
    ens, _ = read(tmp_path / "a")
    assert ens.num_members == 1 and ens.member_names == ["child-0"] and summary["notes"]["budget_parent_epochs"] == 2
    assert summary["notes"]["children"]["child-0"]["steps"] == 2 * 7  # 120 images in batches of 16: 7 a epoch
    parent = tiny_model("test_resnet").state_dict()
    assert not torch.equal(ens.groups[0].member_state_dict(0)["fc.weight"], parent["fc.weight"])


def test_drawn_augmentation_strengths_build_their_transforms():
    from torchvision import transforms as T

    from posthoc.data import resolve_data_config, train_transform

    config = resolve_data_config(tiny_model("test_resnet"))
    crop = next(t for t in train_transform(config, "light:0.25").transforms if isinstance(t, T.RandomCrop))
    assert crop.padding == 8  # a quarter of the 32-pixel side (light: 1/8, 4 pixels)
    resized = next(t for t in train_transform(config, "timm:0.3").transforms if hasattr(t, "scale"))
    assert tuple(resized.scale) == (0.3, 1.0)  # timm's RandomResizedCropAndInterpolation
    with pytest.raises(PosthocError, match="augmentation strength must be a number in"):
        train_transform(config, "light:big")
