"""Temperature scaling: the fit, the artifact's temperature at load time, ``posthoc calibrate`` and
``boost --no-temperature-scaling``."""

from __future__ import annotations

import json

import pytest
import torch

import posthoc
from posthoc import Combine, Ensemble
from posthoc.cli import main
from posthoc.ensemble import combine_probabilities
from posthoc.metrics import fit_temperature
from posthoc.temperature import fit_ensemble_temperature

from .helpers import QUIET, tiny_model

X = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_fit_recovers_a_known_temperature_within_two_percent():
    gen = torch.Generator().manual_seed(0)
    z = 2.0 * torch.randn(200_000, 5, generator=gen)
    y = torch.multinomial(z.softmax(-1), 1, generator=gen).squeeze(1)
    for true_t in (0.5, 3.0):
        assert abs(fit_temperature(true_t * z, y) / true_t - 1) < 0.02  # logits true_t * z need T = true_t


def test_ensemble_fit_recovers_the_temperature_of_the_combined_prediction():
    gen = torch.Generator().manual_seed(1)
    z = 2.0 * torch.randn(3, 100_000, 4, generator=gen)  # three members
    y = torch.multinomial(combine_probabilities(z, "prob_mean"), 1, generator=gen).squeeze(1)
    t, before, after = fit_ensemble_temperature(2.5 * z, y, "prob_mean")
    assert abs(t / 2.5 - 1) < 0.02 and after["nll"] < before["nll"]
    with pytest.raises(posthoc.PosthocError, match="hard vote has no temperature"):
        fit_ensemble_temperature(z, y, "vote")


def test_loaded_artifact_applies_its_temperature(tmp_path):
    model = tiny_model("test_resnet")
    posthoc.save(Ensemble.from_models([model], combine=Combine(temperature=2.5)), tmp_path / "t")
    loaded = posthoc.load(tmp_path / "t")
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), (model(X) / 2.5).softmax(-1), atol=1e-5, rtol=0)


def test_calibrate_a_checkpoint_then_recalibrate_changes_only_the_temperature(tmp_path, capsys, resnet_dir, image_data):
    common = ["--data", str(image_data), "--workers", "0", "--tta", "none"]  # views: tests/test_views.py
    assert main(["calibrate", str(resnet_dir), "--out", str(tmp_path / "c"), *common]) == 0
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    t = config["combine"]["temperature"]
    assert config["num_members"] == 1 and t != 1.0 and config["method"]["name"] == "calibrate"
    cal = config["method"]["measured"]["calibration"]
    assert cal["select_after"]["nll"] <= cal["select_before"]["nll"] and config["data"]["tuned_on"] == "val:select"
    # the calibrated checkpoint is softmax(logits / T) of the checkpoint
    parent = posthoc.load_model(str(resnet_dir))
    with torch.no_grad():
        torch.testing.assert_close(posthoc.load(tmp_path / "c")(X), (parent(X) / t).softmax(-1), atol=1e-5, rtol=0)
    assert main(["info", str(tmp_path / "c")]) == 0 and f"temperature {t:.3g}" in capsys.readouterr().out

    # an ensemble artifact: only the temperature changes, the weights file stays bit-identical
    assert main(["ensemble", str(resnet_dir), str(resnet_dir), "--out", str(tmp_path / "e")]) == 0
    assert main(["calibrate", str(tmp_path / "e"), "--out", str(tmp_path / "e2"), *common]) == 0
    before = json.loads((tmp_path / "e" / "config.json").read_text())
    after = json.loads((tmp_path / "e2" / "config.json").read_text())
    assert (tmp_path / "e" / "model.safetensors").read_bytes() == (tmp_path / "e2" / "model.safetensors").read_bytes()
    assert after["combine"]["temperature"] != 1.0
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"combine", "method", "metrics", "data", "integrity"}  # the record covers the rest
    assert after["method"]["config"] == before["method"]["config"] and after["sources"] == before["sources"]
    # re-calibrating a calibrated artifact fits the same temperature (the fit starts from raw logits)
    assert main(["calibrate", str(tmp_path / "e2"), "--out", str(tmp_path / "e3"), *common]) == 0
    again = json.loads((tmp_path / "e3" / "config.json").read_text())
    assert again["combine"]["temperature"] == pytest.approx(after["combine"]["temperature"], rel=1e-6)


def test_boost_without_temperature_scaling_leaves_outputs_unchanged(tmp_path, resnet_dir, image_data):
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
        "3",
        "--kl-samples",
        "20",
        "--bn-batches",
        "1",
        "--tta",
        "none",
    ]
    assert main([*args, "--out", str(tmp_path / "on")]) == 0
    assert main([*args, "--out", str(tmp_path / "off"), "--no-temperature-scaling"]) == 0
    on, off = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("on", "off"))
    assert off["combine"]["temperature"] == 1.0 and on["combine"]["temperature"] != 1.0
    assert "temperature" not in off["method"]["measured"] and "temperature" in on["method"]["measured"]
    assert (tmp_path / "on" / "model.safetensors").read_bytes() == (tmp_path / "off" / "model.safetensors").read_bytes()
    from posthoc.artifact import read

    ens, ensemble = posthoc.load(tmp_path / "off"), read(tmp_path / "off")[0]
    with torch.no_grad():
        expected = torch.stack([m(X).softmax(-1) for m in ensemble.members()]).mean(0)
        torch.testing.assert_close(ens(X), expected, atol=1e-5, rtol=0)


def test_cross_validation_rejects_a_temperature_that_would_hurt_new_images():
    from posthoc.temperature import cross_validated_nll

    gen = torch.Generator().manual_seed(3)
    z = torch.randn(1, 40, 4, generator=gen)
    y = z[0].argmax(-1).clone()
    y[torch.randperm(40, generator=gen)[:4]] = (y[:4] + 1) % 4  # a few surprising labels, unlike the rest
    fitted, unscaled = cross_validated_nll(3.0 * z, y, "prob_mean")
    assert fitted > 0 and unscaled > 0
    # well-behaved logits: labels drawn from softmax(z / 2) on many images, so a fitted T of ~2 helps held-out halves
    z = 2.0 * torch.randn(1, 20_000, 5, generator=gen)
    y = torch.multinomial((z[0] / 2).softmax(-1), 1, generator=gen).squeeze(1)
    fitted, unscaled = cross_validated_nll(z, y, "prob_mean")
    assert fitted < unscaled
