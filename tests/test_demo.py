"""``posthoc demo`` runs offline end to end on the digits scikit-learn ships."""

from __future__ import annotations

import json

from posthoc.cli import main
from posthoc.commands.demo import write_digits


def test_digits_are_written_as_image_folder(tmp_path):
    root = write_digits(tmp_path)
    train = list((root / "train").rglob("*.png"))
    val = list((root / "val").rglob("*.png"))
    assert len(train) + len(val) == 1797
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(d) for d in range(10)]


def test_demo_default_is_the_resample_mean_model(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--parent-epochs", "2", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "held-out digits" in out and "resample" in out
    config = json.loads((tmp_path / "parent-2ep-s0-resample" / "config.json").read_text())
    assert config["num_members"] == 1 and config["members"][0]["name"] == "mean"
    assert config["data"]["tuned_on"] == "val:select"


def test_demo_takes_another_method_and_its_options(tmp_path, capsys):
    argv = [
        "demo",
        "--out",
        str(tmp_path),
        "--parent-epochs",
        "2",
        "--no-progress",
        "--method",
        "noisy",
        "--population",
        "4",
        "--members",
        "3",
        "--kl-samples",
        "50",
        "--seed",
        "1",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "parent-2ep-s1-noisy" / "config.json").read_text())
    assert config["num_members"] == 3 and config["members"][0]["name"] == "parent"  # 2 children + the parent
    assert config["method"]["config"]["seed"] == 1
