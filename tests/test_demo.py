"""``posthoc demo`` runs offline end to end on the digits scikit-learn ships."""

from __future__ import annotations

import json

from posthoc.cli import main
from posthoc.demo import write_digits


def test_digits_are_written_as_image_folder(tmp_path):
    root = write_digits(tmp_path)
    train = list((root / "train").rglob("*.png"))
    val = list((root / "val").rglob("*.png"))
    assert len(train) + len(val) == 1797
    assert sorted(p.name for p in (root / "train").iterdir()) == [str(d) for d in range(10)]


def test_demo_end_to_end(tmp_path, capsys):
    code = main(
        [
            "demo",
            "--out",
            str(tmp_path),
            "--parent-epochs",
            "3",
            "--no-progress",
            "--population",
            "4",
            "--members",
            "3",
            "--kl-samples",
            "50",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "held-out digits" in out and "parent" in out
    config = json.loads((tmp_path / "parent-noisy" / "config.json").read_text())
    assert config["num_members"] == 3 and config["members"][0]["name"] == "parent"  # 2 children + the parent
    assert config["data"]["tuned_on"] == "val:select"
