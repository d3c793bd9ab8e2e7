"""``posthoc distill``: the student moves toward the teacher on held-out images, the teacher is untouched,
the same seed gives the same student, and the student is an ordinary artifact."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import posthoc
from posthoc.artifact import seal
from posthoc.cli import main
from posthoc.command_options import DistillConfig
from posthoc.commands.distill import distill
from posthoc.data import eval_transform, make_loader, open_split, resolve_data_config
from posthoc.distillation import distillation_loss, mixed_batches
from posthoc.errors import PosthocError

from .helpers import QUIET, save_hub_layout, tiny_model


def _trained(seed: int, data):
    """A tiny model trained for a few epochs on the generated images (so its predictions are not uniform)."""
    from posthoc.data import train_transform
    from posthoc.training import cycle, train_steps

    model = tiny_model("test_resnet", seed=seed)
    loader = make_loader(
        open_split(data, "train", train_transform(resolve_data_config(model))),
        16,
        shuffle=True,
        seed=seed,
        workers=0,
        drop_last=True,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    train_steps(model.train(), cycle(loader, 8 * len(loader)), opt)
    return model.eval()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, image_data):
    root = tmp_path_factory.mktemp("teacher")
    parents = [save_hub_layout(_trained(s, image_data), root / f"p{s}") for s in (1, 2)]
    out = root / "deep2"
    assert main(["ensemble", *map(str, parents), "--out", str(out)]) == 0
    return out


def _kl_to_teacher(student_dir, teacher_dir, data) -> float:
    teacher = posthoc.load(teacher_dir)
    student = posthoc.load_model(str(student_dir))
    loader = make_loader(open_split(data, "val:report", eval_transform(resolve_data_config(teacher))), 64, workers=0)
    total, n = 0.0, 0
    with torch.no_grad():
        for x, _ in loader:
            p = teacher(x).clamp_min(1e-12)
            q = student(x)
            q = q if getattr(student, "returns_probabilities", False) else q.softmax(-1)
            total += float((p * (p.log() - q.clamp_min(1e-12).log())).sum())
            n += len(x)
    return total / n


FAST = DistillConfig(epochs=3, temperature=1.0, alpha=1.0, max_lr=0.05, batch_size=16, seed=3)


def test_student_moves_toward_the_teacher_on_held_out_images(tmp_path, teacher, resnet_dir, image_data):
    weights = (teacher / "model.safetensors").read_bytes()
    r = distill(
        str(teacher),
        image_data,
        tmp_path / "s",
        student=str(resnet_dir),
        config=FAST,
        workers=0,
        progress=False,
        log=lambda m: None,
        temperature_scaling=False,
    )
    assert (teacher / "model.safetensors").read_bytes() == weights  # the teacher is never changed
    before = _kl_to_teacher(resnet_dir, teacher, image_data)  # an untrained student
    after = _kl_to_teacher(tmp_path / "s", teacher, image_data)
    assert after < 0.5 * before, (before, after)
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["num_members"] == 1 and config["method"]["name"] == "distill"
    assert config["method"]["measured"]["teacher"] == str(teacher) and config["sources"] == [str(resnet_dir)]
    assert r["cost_parent_epochs"] == pytest.approx(3 + 3 * r["teacher_flops_ratio"] / 3)


def test_same_seed_gives_the_same_student_and_it_is_an_ordinary_artifact(tmp_path, capsys, teacher, image_data):
    for d in ("a", "b"):
        distill(str(teacher), image_data, tmp_path / d, config=FAST, workers=0, progress=False, log=lambda m: None)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    assert (
        main(
            [
                "eval",
                str(tmp_path / "a"),
                "--data",
                str(image_data),
                "--split",
                "val:report",
                *QUIET,
            ]
        )
        == 0
    )
    assert main(["info", str(tmp_path / "a")]) == 0
    assert f"distilled from | {teacher}".replace(" | ", " ") in " ".join(capsys.readouterr().out.split())


def test_cached_teacher_and_consensus_loss(tmp_path, teacher, image_data):
    cached = DistillConfig(epochs=2, temperature=2.0, max_lr=0.05, batch_size=16, cache_teacher=True)
    r = distill(str(teacher), image_data, tmp_path / "c", config=cached, workers=0, progress=False, log=lambda m: None)
    assert r["cost_parent_epochs"] == pytest.approx(2 + r["teacher_flops_ratio"] / 3)  # one teacher pass for both epochs
    consensus = DistillConfig(epochs=1, consensus=True, batch_size=16)
    assert consensus.alpha == 1.0
    distill(str(teacher), image_data, tmp_path / "k", config=consensus, workers=0, progress=False, log=lambda m: None)
    assert posthoc.load(tmp_path / "k").num_members == 1


def test_mixup_mixes_images_and_targets_with_one_weight_per_batch():
    x = torch.arange(5 * 3, dtype=torch.float32).reshape(5, 3, 1, 1)
    y, i = torch.tensor([0, 1, 2, 1, 0]), torch.arange(5)
    (mx, mi), my = next(mixed_batches([((x, i), y)], 0.4, 3, seed=7))
    assert len(mx) == len(my) == len(mi) == 4  # the odd image is dropped, none is mixed with itself
    lam = float(my[0, 0])  # image 0 (class 0) is mixed with image 3 (class 1)
    assert 0 < lam < 1 and torch.allclose(my.sum(-1), torch.ones(4))
    torch.testing.assert_close(mx, lam * x[:4] + (1 - lam) * x[:4].flip(0))
    again = next(mixed_batches([((x, i), y)], 0.4, 3, seed=7))
    assert torch.equal(again[0][0], mx)  # seeded


def test_mixup_distils_on_mixed_images_and_excludes_a_cached_teacher(tmp_path, teacher, image_data):
    cfg = DistillConfig(epochs=1, mixup=1.0, batch_size=16)
    distill(str(teacher), image_data, tmp_path / "m", config=cfg, workers=0, progress=False, log=lambda m: None)
    plain = DistillConfig(epochs=1, batch_size=16)
    distill(str(teacher), image_data, tmp_path / "p", config=plain, workers=0, progress=False, log=lambda m: None)
    assert (tmp_path / "m" / "model.safetensors").read_bytes() != (tmp_path / "p" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["method"]["config"]["mixup"] == 1.0
    with pytest.raises(PosthocError, match="drop --cache-teacher"):
        DistillConfig(mixup=1.0, cache_teacher=True)
    with pytest.raises(PosthocError, match="--mixup must be at least 0"):
        DistillConfig(mixup=-1)


def test_losses_are_zero_at_agreement_where_they_should_be():
    logits = torch.randn(6, 4)
    y = logits.argmax(-1)
    teacher = logits.log_softmax(-1)
    kd_only = DistillConfig(alpha=1.0, temperature=3.0)
    assert distillation_loss(logits, teacher, y, kd_only).abs() < 1e-6  # KL to itself
    consensus = DistillConfig(consensus=True)
    entropy = -(teacher.exp() * teacher).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(logits, y)
    torch.testing.assert_close(distillation_loss(logits, teacher, y, consensus), ce + 2 * entropy)  # SCE = 2 H at agreement


def test_boost_with_distill_writes_student_and_teacher(tmp_path, capsys, resnet_dir, image_data):
    out = tmp_path / "r"
    args = [
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
        "--members",
        "2",
        "--bn-batches",
        "1",
        "--distill",
        "--distill-epochs",
        "0.5",
    ]
    assert main(args) == 0, capsys.readouterr().err
    assert "distilled student on the select part" in capsys.readouterr().out
    student, teacher_cfg = (json.loads((d / "config.json").read_text()) for d in (out, tmp_path / "r-teacher"))
    assert student["num_members"] == 1 and teacher_cfg["num_members"] == 2
    assert student["method"]["measured"]["teacher"] == str(tmp_path / "r-teacher")


def test_distill_refuses_a_checkpoint_as_teacher(tmp_path, capsys, resnet_dir, image_data):
    assert main(["distill", str(resnet_dir), "--data", str(image_data), "--out", str(tmp_path / "x")]) == 2
    assert "is not an ensemble artifact" in capsys.readouterr().err


def test_a_recorded_parent_that_is_not_found_from_here_asks_for_student(tmp_path, capsys, monkeypatch, teacher, image_data):
    # The deep ensemble was built from absolute paths; the parent recorded as a relative path (as a user
    # gives it) does not resolve from another working directory.
    moved = tmp_path / "deep2"
    shutil.copytree(teacher, moved)
    config = json.loads((moved / "config.json").read_text())
    config["sources"] = ["../elsewhere/p1", *config["sources"][1:]]
    (moved / "config.json").write_text(json.dumps(seal(config)))  # an edit of one's own, sealed
    monkeypatch.chdir(tmp_path)
    assert main(["distill", str(moved), "--data", str(image_data), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "cannot load the teacher's recorded parent '../elsewhere/p1'" in err and "--student SPEC" in err
    assert not (tmp_path / "s").exists()
