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
from posthoc.methods.sparse import Annealer, Masked, SparseConfig, group_masks, prunable_tensors
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
        (["--schedule", "cyclic"], "must be one of onecycle, constant, got 'cyclic'"),
    ],
)
def test_cli_flag_errors(tmp_path, capsys, resnet_dir, image_data, flags, message):
    code = main(["boost", str(resnet_dir), "--method", "sparse", "--data", str(image_data), "--out", str(tmp_path / "x"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
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
    assert (default.keep, default.children, default.include_parent, default.parent_epochs) == (1.0, 2, True, 4.0)
    for given in ({"anneal": "temperature"}, {"partition": 2}, {"structure": "channel"}, {"mask_source": "l1", "partition": 1}):
        assert make_config(SparseConfig, given).keep == 0.5, given
    assert make_config(SparseConfig, {"keep": 0.8, "anneal": "random"}).keep == 0.8  # given: never changed
    assert make_config(SparseConfig, {"couple": True}).include_parent is False
    assert make_config(SparseConfig, {"include_parent": True}).siblings == 1


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
