"""``noisy``: exact mirrored/partitioned children, the KL search, determinism, data hygiene."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posthoc import PosthocError
from posthoc.cli import main
from posthoc.commands.boost import boost
from posthoc.data import ImageSet
from posthoc.methods.noisy import Child, ChildScorer, Mutator, kl_to_parent, mutable_tensors, population_plan, search_sigma

from .helpers import QUIET, assert_same_artifact, run_boost, tiny_model


def test_four_children_of_one_draw_are_mirrored_and_partitioned():
    parent = tiny_model("test_resnet")
    names = mutable_tensors(parent)
    mutator = Mutator(parent, names, density=0.5, noise="absolute", seed=3)
    sigma = 0.05
    plan = population_plan(4, antithetic=True)
    assert [c.name for c in plan] == ["d0+M", "d0+~M", "d0-M", "d0-~M"]
    kids = [mutator.child(c, sigma) for c in plan]
    for name in names:
        w = parent.get_parameter(name).detach()
        z, m = mutator.unit_draw(0)[name]
        n = sigma * z
        mask = m.float()
        assert torch.equal(kids[0][name], w + n * m)
        assert torch.equal(kids[1][name], w + n * ~m)
        assert torch.equal(kids[2][name], w - n * m)
        assert torch.equal(kids[3][name], w - n * ~m)
        # the two masks partition the tensor, and about half the weights move in each child
        assert torch.equal(mask + (~m).float(), torch.ones_like(mask))
        assert 0.3 < mask.mean() < 0.7 or mask.numel() < 50


def test_relative_noise_scales_by_weight_std():
    parent = tiny_model("test_resnet")
    names = mutable_tensors(parent)
    mutator = Mutator(parent, names, density=1.0, noise="relative", seed=0)
    child = mutator.child(Child(0, 1, False), 0.1)
    for name in names[:3]:
        w = parent.get_parameter(name).detach()
        z, _ = mutator.unit_draw(0)[name]
        assert torch.allclose(child[name], w + 0.1 * w.std() * z)


def test_last_layers_keep_only_last_blocks_and_classifier():
    parent = tiny_model("test_resnet")
    assert mutable_tensors(parent, layers=1) == ["fc.weight"]
    scoped = mutable_tensors(parent, layers=2)
    assert scoped[-1] == "fc.weight" and all(n.startswith(("layer4.", "fc.")) for n in scoped)
    assert set(scoped) < set(mutable_tensors(parent))


def test_bisection_hits_target_kl_within_ten_percent(image_data):
    from posthoc.data import eval_transform, open_split, resolve_data_config
    from posthoc.training import materialize as collect_inputs

    parent = tiny_model("test_resnet", seed=2)
    ds = open_split(image_data, "val", eval_transform(resolve_data_config(parent)))
    x, y = collect_inputs(torch.utils.data.DataLoader(ds, batch_size=30))
    names = mutable_tensors(parent)
    scorer = ChildScorer(parent, names, x, y, torch.device("cpu"))
    mutator = Mutator(parent, names, 0.5, "absolute", seed=0)
    for target in (0.01, 0.05):

        def kl_at(s):
            return kl_to_parent(scorer.parent_logits, scorer.logits(mutator.child(Child(0, 1, False), s)))

        sigma, kl, trace = search_sigma(kl_at, target, start=1e-3, tolerance=0.05)
        assert abs(kl / target - 1) <= 0.10, (target, sigma, kl, trace)
        assert abs(kl_at(sigma) - kl) < 1e-9  # common random numbers: the same sigma gives the same KL


def test_scored_suffix_matches_full_child(image_data):
    parent = tiny_model("test_resnet", seed=1)
    names = mutable_tensors(parent, layers=2)
    x = torch.randn(6, 3, 32, 32)
    scorer = ChildScorer(parent, names, x, torch.zeros(6, dtype=torch.long), torch.device("cpu"))
    mutator = Mutator(parent, names, 0.5, "absolute", seed=0)
    tensors = mutator.child(Child(1, -1, True), 0.05)
    child = tiny_model("test_resnet", seed=1)
    with torch.no_grad():
        for n, t in tensors.items():
            child.get_parameter(n).copy_(t)
        assert torch.allclose(scorer.logits(tensors), child(x), atol=1e-5)


def test_same_seed_gives_bit_identical_artifact(tmp_path, resnet_dir, image_data):
    run_boost(resnet_dir, "noisy", image_data, tmp_path / "a", seed=7)
    run_boost(resnet_dir, "noisy", image_data, tmp_path / "b", seed=7)
    run_boost(resnet_dir, "noisy", image_data, tmp_path / "c", seed=8)
    read = lambda d, f: (tmp_path / d / f).read_bytes()
    assert_same_artifact(tmp_path / "a", tmp_path / "b")
    assert read("a", "model.safetensors") != read("c", "model.safetensors")
    config = json.loads(read("a", "config.json"))
    measured = config["method"]["measured"]
    assert measured["sigma"] > 0 and len(measured["selected"]) == 4
    assert config["data"]["tuned_on"] == "val:select"


def test_selection_never_reads_report_images(tmp_path, monkeypatch, resnet_dir, image_data):
    from posthoc.data import open_split

    report = {
        Path(p).name + Path(p).parent.name
        for p, _ in (open_split(image_data, "val").samples[i] for i in open_split(image_data, "val:report").indices)
    }
    seen = []
    original = ImageSet.__getitem__

    def spy(self, index):
        path = self.source.describe(index)
        seen.append(Path(path))
        return original(self, index)

    monkeypatch.setattr(ImageSet, "__getitem__", spy)
    run_boost(resnet_dir, "noisy", image_data, tmp_path / "a", bn_batches=1)
    val_seen = {p.name + p.parent.name for p in seen if p.parent.parent.name == "val"}
    assert val_seen and not (val_seen & report)


def test_bn_recalibration_changes_only_scoped_statistics(tmp_path, resnet_dir, image_data):
    run_boost(resnet_dir, "noisy", image_data, tmp_path / "a", last_layers=2, bn_batches=2)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    stacked = config["groups"][0]["member_tensors"]
    assert any(n.endswith("running_var") for n in stacked)
    assert all(n.startswith(("layer4.", "fc.")) for n in stacked)


def test_cli_boost_with_method_flags(tmp_path, capsys, resnet_dir, image_data):
    out = tmp_path / "n"
    code = main(
        [
            "boost",
            str(resnet_dir),
            "--method",
            "noisy",
            "--data",
            str(image_data),
            "--out",
            str(out),
            *QUIET,
            "--population",
            "4",
            "--members",
            "3",
            "--kl-samples",
            "10",
            "--include-parent",
            "--target-kl=0.05",
            "--last-layers",
            "2",
        ]
    )
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    cfg = config["method"]["config"]
    assert cfg["population"] == 4 and cfg["target_kl"] == 0.05 and cfg["include_parent"] and cfg["last_layers"] == 2
    # --members counts every member of the artifact, the parent included
    assert config["num_members"] == 3 and config["members"][0]["name"] == "parent" and config["method"]["include_parent"]
    assert main(["methods", "noisy"]) == 0
    assert "--target-kl" in capsys.readouterr().out


def test_method_options_are_listed_by_boost_help(capsys):
    assert main(["boost", "--method", "noisy", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ("--target-kl", "--last-layers", "--include-parent", "accuracy|nll", "default: 0.05"):
        assert text in out, text


def test_old_scope_flag_still_works_with_a_deprecation_line(tmp_path, capsys, resnet_dir, image_data):
    args = [
        "boost",
        str(resnet_dir),
        "--method",
        "noisy",
        "--data",
        str(image_data),
        *QUIET,
        "--population",
        "4",
        "--members",
        "2",
        "--kl-samples",
        "10",
        "--bn-batches",
        "1",
    ]
    assert main([*args, "--out", str(tmp_path / "old"), "--scope", "1"]) == 0
    err = capsys.readouterr().err
    assert "--scope is deprecated" in err and "use --last-layers 2" in err
    assert main([*args, "--out", str(tmp_path / "new"), "--last-layers", "2"]) == 0
    old, new = ((tmp_path / d / "model.safetensors").read_bytes() for d in ("old", "new"))
    assert old == new


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--densty", "0.3"], "No such option: --densty"),
        (["--density", "2"], "--density must be at most 1, got 2"),
        (["--members", "many"], "Invalid value for '--members'"),
        (["--fitness", "f1"], "must be one of accuracy, nll, got 'f1'"),
        (["--members", "9", "--population", "4"], "keeps 8 children"),
    ],
)
def test_cli_boost_flag_errors(tmp_path, capsys, resnet_dir, image_data, flags, message):
    code = main(["boost", str(resnet_dir), "--method", "noisy", "--data", str(image_data), "--out", str(tmp_path / "x"), *flags])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_unknown_method(resnet_dir, image_data):
    with pytest.raises(PosthocError, match="unknown method 'noisey'; available: .*noisy"):
        boost([str(resnet_dir)], "noisey", image_data)
