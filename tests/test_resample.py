"""``resample``: exact Welford statistics, seeded draws, BN recalibration, saved statistics, options."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from posthoc import PosthocError
from posthoc.cli import main
from posthoc.data import make_loader, open_split, resolve_data_config, train_transform
from posthoc.methods import BoostContext
from posthoc.methods.resample import (
    Resample,
    WelfordStats,
    draw_members,
    finetune_with_stats,
    trainable_parameters,
)
from posthoc.sources import load_model

from .helpers import QUIET, assert_same_artifact, run_boost, tiny_model


def _random_batches(n: int, seed: int = 0, size: int = 8):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 32, 32, generator=gen), torch.randint(0, 3, (size,), generator=gen)) for _ in range(n)]


def _spy_snapshots(monkeypatch) -> list[dict[str, torch.Tensor]]:
    """Record (as float64 copies) every snapshot folded into any WelfordStats."""
    seen: list[dict[str, torch.Tensor]] = []
    original = WelfordStats.update

    def update(self, tensors):
        seen.append({n: t.detach().double().clone() for n, t in tensors.items()})
        original(self, tensors)

    monkeypatch.setattr(WelfordStats, "update", update)
    return seen


@pytest.mark.parametrize("dtype, burn_in, every", [(torch.float32, 0, 1), (torch.float64, 3, 2)])
def test_welford_matches_torch_mean_and_population_var(monkeypatch, dtype, burn_in, every):
    model = tiny_model("test_resnet")
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = _spy_snapshots(monkeypatch)
    stats, summary = finetune_with_stats(
        model, _random_batches(4), 10, lr=0.2, momentum=0.5, burn_in=burn_in, every=every, dtype=dtype
    )
    assert summary["steps"] == 10 and stats.count == len(seen) == (10 - burn_in) // every
    # every trainable parameter is tracked, and the samples are post-update iterates
    assert stats.names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert not torch.equal(seen[0]["fc.weight"], start["fc.weight"].double())
    var = stats.var()
    moved = 0
    for name in stats.names:
        snaps = torch.stack([s[name] for s in seen])
        ref_mean, ref_var = torch.mean(snaps, 0), torch.var(snaps, 0, unbiased=False)
        assert stats.mean[name].dtype == dtype
        torch.testing.assert_close(stats.mean[name].double(), ref_mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(var[name].double(), ref_var, atol=1e-6, rtol=0)
        moved += int((ref_var > 1e-8).sum())
    assert moved > 1000  # the trajectory really moved, so the comparison is not of zeros
    # the final iterate is the last snapshot (no step after the last record when every divides)
    if (10 - burn_in) % every == 0:
        assert torch.equal(seen[-1]["fc.weight"], model.get_parameter("fc.weight").detach().double())


def test_variance_never_negative():
    gen = torch.Generator().manual_seed(0)
    # constant snapshots (a frozen weight), and a large offset with tiny noise in float32, where the
    # textbook E[x^2] - E[x]^2 cancels catastrophically and goes negative
    stats = WelfordStats({"const": torch.zeros(1000), "offset": torch.zeros(1000)}, dtype=torch.float32)
    exact = WelfordStats({"offset": torch.zeros(1000)}, dtype=torch.float64)
    snaps = []
    for _ in range(200):
        x = (1000 + 1e-4 * torch.randn(1000, generator=gen, dtype=torch.float64)).float()
        snaps.append(x)
        stats.update({"const": torch.full((1000,), 0.3), "offset": x})
        exact.update({"offset": x})
    snaps = torch.stack(snaps)
    naive = (snaps**2).mean(0) - snaps.mean(0) ** 2
    assert (naive < 0).any()  # the data really is adversarial
    var = stats.var()
    assert torch.equal(var["const"], torch.zeros(1000))
    assert (var["offset"] >= 0).all() and (stats.m2["offset"] >= 0).all() and (stats.std()["offset"] >= 0).all()
    # float32 keeps the right magnitude; float64 accumulators are exact here
    assert 0.3e-8 < float(var["offset"].mean()) < 3e-8
    torch.testing.assert_close(exact.var()["offset"], torch.var(snaps.double(), 0, unbiased=False), atol=1e-13, rtol=0)


def _stats_of(model, steps=6, seed=0):
    stats, _ = finetune_with_stats(model, _random_batches(3, seed), steps, lr=0.3)
    return stats


def test_same_seed_gives_same_members_drawn_from_the_gaussian():
    model = tiny_model("test_resnet")
    stats = _stats_of(model)
    a = draw_members(stats, 3, 2.0, seed=5)
    b = draw_members(stats, 3, 2.0, seed=5)
    c = draw_members(stats, 3, 2.0, seed=6)
    for name in stats.names:
        for j in range(3):
            assert torch.equal(a[j][name], b[j][name])
        assert not torch.equal(a[0][name], a[1][name]) or stats.var()[name].max() == 0
    assert not torch.equal(a[0]["fc.weight"], c[0]["fc.weight"])
    # member j does not depend on how many are drawn
    assert all(torch.equal(draw_members(stats, 2, 2.0, seed=5)[1][n], a[1][n]) for n in stats.names)
    # (member - mean) / std is N(0, scale^2) over the weights that moved
    std = stats.std()
    z = torch.cat([((a[0][n] - stats.mean[n]) / std[n])[std[n] > 1e-7] for n in stats.names])
    assert z.numel() > 1000 and abs(float(z.std()) - 2.0) < 0.1 and abs(float(z.mean())) < 0.1


def test_stats_round_trip_through_safetensors(tmp_path):
    stats = _stats_of(tiny_model("test_resnet"))
    path = stats.save(tmp_path / "s.safetensors", {"architecture": "test_resnet"})
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        assert f.metadata()["format"] == "posthoc-welford" and f.metadata()["architecture"] == "test_resnet"
    assert "count" in keys and {f"mean.{n}" for n in stats.names} < keys and {f"m2.{n}" for n in stats.names} < keys
    loaded, _meta = WelfordStats.load(path)
    assert loaded.names == stats.names and loaded.count == stats.count == 6
    for n in stats.names:
        assert torch.equal(loaded.mean[n], stats.mean[n]) and torch.equal(loaded.m2[n], stats.m2[n])
    assert all(
        torch.equal(x[n], y[n])
        for x, y in zip(draw_members(loaded, 2, 1.0, 0), draw_members(stats, 2, 1.0, 0))
        for n in stats.names
    )
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PosthocError, match="not a readable safetensors file"):
        WelfordStats.load(tmp_path / "bad.safetensors")


# --------------------------------------------------------------------------------- through boost
def test_same_seed_gives_bit_identical_artifact(tmp_path, resnet_dir, image_data):
    run_boost(resnet_dir, "resample", image_data, tmp_path / "a", seed=3, members=3, include_mean=True)
    run_boost(resnet_dir, "resample", image_data, tmp_path / "b", seed=3, members=3, include_mean=True)
    run_boost(resnet_dir, "resample", image_data, tmp_path / "c", seed=4, members=3, include_mean=True)
    read = lambda d, f: (tmp_path / d / f).read_bytes()
    assert_same_artifact(tmp_path / "a", tmp_path / "b")
    assert read("a", "model.safetensors") != read("c", "model.safetensors")
    config = json.loads(read("a", "config.json"))
    measured = config["method"]["measured"]
    assert measured["steps"] == 7 and measured["snapshots"] == 7 and measured["mean_std"] > 0
    assert [m["name"] for m in config["members"]] == ["mean", "sample-0", "sample-1"]
    assert config["data"]["tuned_on"] == "val:select"


def test_bn_statistics_change_after_recalibration(tmp_path, resnet_dir, image_data):
    from posthoc.artifact import read

    run_boost(resnet_dir, "resample", image_data, tmp_path / "r", members=1, include_mean=True, bn_batches=2, seed=1)
    run_boost(resnet_dir, "resample", image_data, tmp_path / "k", members=1, include_mean=True, bn_batches=0, seed=1)
    recal, _ = read(tmp_path / "r")
    kept, _ = read(tmp_path / "k")
    assert recal.num_members == 1 and recal.member_names == ["mean"]
    r, k = recal.groups[0].member_state_dict(0), kept.groups[0].member_state_dict(0)
    parent = tiny_model("test_resnet").state_dict()
    bn_keys = [n for n in r if n.endswith(("running_mean", "running_var"))]
    assert bn_keys
    weights = [n for n, p in tiny_model("test_resnet").named_parameters()]
    assert all(torch.equal(r[n], k[n]) for n in weights)  # the same fine-tune and mean weights
    assert all(not torch.equal(r[n], k[n]) and not torch.equal(r[n], parent[n]) for n in bn_keys)
    # the stored statistics are update_bn's over the first 2 training batches (eval transform) of seed 1
    model = tiny_model("test_resnet")
    model.load_state_dict(k)
    ds = open_split(image_data, "train", train_transform(resolve_data_config(model), "none"))
    loader = make_loader(ds, 128, shuffle=True, seed=1, workers=0, drop_last=True)
    torch.optim.swa_utils.update_bn((x for x, _ in loader), model)
    for n in bn_keys:
        torch.testing.assert_close(r[n], model.state_dict()[n])


def test_members_have_their_own_bn_statistics(tmp_path, resnet_dir, image_data):
    run_boost(resnet_dir, "resample", image_data, tmp_path / "a", members=3)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    stacked = config["groups"][0]["member_tensors"]
    assert [m["name"] for m in config["members"]] == ["sample-0", "sample-1", "sample-2"]
    assert "fc.weight" in stacked and any(n.endswith("running_var") for n in stacked)
    assert config["combine"]["rule"] == "prob_mean"


def test_saved_stats_redraw_without_finetuning(tmp_path, monkeypatch, resnet_dir, image_data):
    stats_file = tmp_path / "stats" / "s.safetensors"
    run_boost(resnet_dir, "resample", image_data, tmp_path / "a", save_stats=str(stats_file), seed=2)
    stats, meta = WelfordStats.load(stats_file)
    assert stats.count == 7 and json.loads(meta["finetune"])["lr"] > 0 and meta["architecture"] == "test_resnet"
    import posthoc.methods.resample as rs

    def no_finetune(*a, **k):
        raise AssertionError("--stats must not fine-tune")

    monkeypatch.setattr(rs, "finetune_with_stats", no_finetune)
    run_boost(resnet_dir, "resample", image_data, tmp_path / "b", stats=str(stats_file), seed=2)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    run_boost(resnet_dir, "resample", image_data, tmp_path / "c", stats=str(stats_file), seed=9, members=1, include_mean=True)
    from posthoc.artifact import read

    mean_member = read(tmp_path / "c")[0].groups[0].member_state_dict(0)
    for n in stats.names:
        assert torch.equal(mean_member[n], stats.mean[n])
    measured = json.loads((tmp_path / "c" / "config.json").read_text())["method"]["measured"]
    assert measured["stats_from"] == str(stats_file) and measured["finetune"]["seed"] == 2


def test_stats_of_another_model_are_refused(tmp_path, resnet_dir, image_data):
    other = tiny_model("test_efficientnet")
    stats = _stats_of(other, steps=2)
    path = stats.save(tmp_path / "o.safetensors")  # no architecture recorded: the parameter check must catch it
    with pytest.raises(PosthocError, match="recorded for other parameters"):
        run_boost(resnet_dir, "resample", image_data, tmp_path / "x", stats=str(path))
    assert not (tmp_path / "x").exists()


def test_fractional_epochs_burn_in_and_every(tmp_path, resnet_dir, image_data):
    s = run_boost(
        resnet_dir, "resample", image_data, tmp_path / "a", epochs=1.5, burn_in=2, every=3, members=1, include_mean=True
    )
    assert s["notes"]["steps"] == 10 and s["notes"]["snapshots"] == (10 - 2) // 3 and s["members"] == 1
    with pytest.raises(PosthocError, match="leave no snapshot"):
        run_boost(resnet_dir, "resample", image_data, tmp_path / "b", epochs=0.5, burn_in=4)
    with pytest.raises(PosthocError, match="at least 2 snapshots"):
        run_boost(resnet_dir, "resample", image_data, tmp_path / "c", epochs=0.5, burn_in=3)


def test_parent_is_left_untouched(image_data):
    parent = tiny_model("test_resnet")
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    dc = resolve_data_config(parent)

    def train_loader(batch_size, shuffle, seed, augment, subset):
        return make_loader(
            open_split(image_data, "train", train_transform(dc, augment)),
            batch_size,
            shuffle=shuffle,
            seed=seed,
            workers=0,
            drop_last=shuffle,
        )

    ctx = BoostContext(
        parents=[parent],
        parent_specs=["tiny"],
        data_config=dc,
        device=torch.device("cpu"),
        make_train_loader=train_loader,
        make_select_loader=None,
        train_size=120,
        select_size=0,
        log=lambda m: None,
        show_progress=False,
    )
    ensemble = Resample(members=2, include_mean=False, batch_size=32, bn_batches=1).build(ctx)
    assert all(torch.equal(before[k], v) for k, v in parent.state_dict().items())
    member = ensemble.members()[0]
    assert not torch.equal(member.state_dict()["fc.weight"], before["fc.weight"])
    assert set(trainable_parameters(member)) <= set(ensemble.groups[0].member_tensors)


def test_cli_boost_with_method_flags(tmp_path, capsys, resnet_dir, image_data):
    out = tmp_path / "r"
    code = main(
        [
            "boost",
            str(resnet_dir),
            "--method",
            "resample",
            "--data",
            str(image_data),
            "--out",
            str(out),
            *QUIET,
            "--epochs",
            "0.5",
            "--batch-size",
            "16",
            "--lr",
            "0.02",
            "--members",
            "3",
            "--include-mean",
            "--std-scale",
            "0.5",
            "--bn-batches",
            "1",
            "--stats-dtype",
            "float64",
        ]
    )
    assert code == 0, capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    cfg = config["method"]["config"]
    assert cfg["epochs"] == 0.5 and cfg["lr"] == 0.02 and cfg["std_scale"] == 0.5 and cfg["include_mean"]
    assert cfg["stats_dtype"] == "float64" and config["method"]["measured"]["steps"] == 4
    assert [m["name"] for m in config["members"]] == ["mean", "sample-0", "sample-1"]
    loaded = load_model(str(out))
    with torch.no_grad():
        probs = loaded(torch.randn(2, 3, 32, 32))
    assert probs.shape == (2, 3)
    assert main(["methods", "resample"]) == 0
    assert "--save-stats" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "-1"], "--lr must be more than 0, got -1"),
        (["--epochs", "0"], "--epochs must be more than 0, got 0"),
        (["--momentum", "1"], "--momentum must be less than 1, got 1"),
        (["--members", "-2"], "--members must be at least 1, got -2"),
        (["--std-scale", "0"], "--std-scale must be more than 0, got 0"),
        (["--every", "0"], "--every must be at least 1, got 0"),
        (["--stats-dtype", "float16"], "must be one of float32, float64, got 'float16'"),
        (["--save-stats", "stats.pt"], "--save-stats must name a .safetensors file"),
        (["--stats", "missing.safetensors"], "does not exist; write one with --save-stats"),
        (["--augment", "heavy"], "must be one of light, timm, none, got 'heavy'"),
    ],
)
def test_cli_boost_flag_errors(tmp_path, capsys, resnet_dir, image_data, flags, message):
    code = main(
        ["boost", str(resnet_dir), "--method", "resample", "--data", str(image_data), "--out", str(tmp_path / "x"), *flags]
    )
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_old_members_zero_and_scale_still_work_with_deprecation_lines(tmp_path, capsys, resnet_dir, image_data):
    args = [
        "boost",
        str(resnet_dir),
        "--method",
        "resample",
        "--data",
        str(image_data),
        *QUIET,
        "--epochs",
        "0.5",
        "--batch-size",
        "16",
        "--bn-batches",
        "1",
    ]
    assert main([*args, "--out", str(tmp_path / "old"), "--members", "0", "--scale", "2"]) == 0
    err = capsys.readouterr().err
    assert "--members 0 is deprecated" in err and "--members 1 --include-mean" in err and "use --std-scale 2" in err
    assert main([*args, "--out", str(tmp_path / "new"), "--members", "1", "--include-mean", "--std-scale", "2"]) == 0
    old, new = ((tmp_path / d / "model.safetensors").read_bytes() for d in ("old", "new"))
    assert old == new
