"""Declared options: one machinery for methods and commands, generated flags, help that reads cleanly, old
spellings that still work for one release with a note."""

from __future__ import annotations

import json

import pytest

from posthoc import PosthocError
from posthoc.cli import main
from posthoc.command_options import BOOST, DISTILL, EVAL
from posthoc.methods._layerwise import RetrainConfig
from posthoc.methods.noisy import NoisyConfig
from posthoc.options import DataOptions, LoaderOptions, PreprocessingOptions, make_config

COMMANDS = ["eval", "boost", "calibrate", "distill", "demo", "methods", "ensemble", "info", "push"]


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS), ["boost", "--method", "sparse"]])
def test_help_shows_no_value_placeholder_for_switches(capsys, command):
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "<bool>" not in out and "Usage: posthoc" in out


def test_option_groups_have_one_help_panel_each(capsys):
    assert main(["boost", "--method", "noisy", "--help"]) == 0
    out = capsys.readouterr().out
    for panel in ("Data", "Preprocessing", "Loading and device", "Output", "Boost", "Options of method 'noisy'"):
        assert f"─ {panel}" in out, panel


def test_values_are_checked_once_with_the_flag_named():
    with pytest.raises(PosthocError, match="--select-size must be at least 1, got 0"):
        make_config(DataOptions, {"data": "d", "select_size": 0})
    with pytest.raises(PosthocError, match="--crop-pct must be at most 2"):
        make_config(PreprocessingOptions, {"crop_pct": 2.5})
    with pytest.raises(PosthocError, match="--mean must be finite numbers"):
        make_config(PreprocessingOptions, {"mean": "nan,0.5,0.5"})
    with pytest.raises(PosthocError, match="--interpolation must be one of bilinear"):
        make_config(PreprocessingOptions, {"interpolation": "random"})
    with pytest.raises(PosthocError, match="--workers must be a whole number"):
        make_config(LoaderOptions, {"workers": 1.5})
    with pytest.raises(PosthocError, match="--inference-budget must be a finite number"):
        BOOST.split({"data": "d", "inference_budget": float("inf")})
    with pytest.raises(PosthocError, match="missing option --data"):
        make_config(DataOptions, {})


def test_a_command_splits_its_options_into_groups_and_leaves_the_rest_to_the_method():
    groups, rest = BOOST.split({"data": "d", "workers": 0, "img_size": 32, "members": 3, "tta": None})
    assert groups[DataOptions].data == "d" and groups[LoaderOptions].workers == 0
    assert groups[PreprocessingOptions].overrides()["img_size"] == 32
    assert rest == {"members": 3}  # what boost hands to the method (and checks there)
    eval_groups, _ = EVAL.split({"data": "d"})
    assert eval_groups[LoaderOptions].batch_size == 256  # eval batches; boost leaves batch size to the method
    distill_groups, _ = DISTILL.split({"data": "d", "out": "o", "batch_size": 32})
    assert distill_groups[DISTILL.groups[0]].batch_size == 32  # the student's batch size, not the loader's


def test_renamed_options_still_work_with_a_note():
    notes = []
    cfg = make_config(NoisyConfig, {"bn_recalibrate": False}, warn=notes.append)
    assert cfg.bn_batches == 0 and "--bn-recalibrate is deprecated" in notes[0] and "--bn-batches 0" in notes[0]
    cfg = make_config(RetrainConfig, {"bn": "train"}, warn=notes.append)
    assert cfg.train_bn is True and "use --train-bn" in notes[1]


def test_old_dtype_spellings_map_to_the_new_names(tmp_path, capsys, resnet_dir):
    out = tmp_path / "e"
    assert main(["ensemble", str(resnet_dir), str(resnet_dir), "--out", str(out), "--dtype", "float16"]) == 0
    err = capsys.readouterr().err
    assert "--dtype is deprecated" in err and "--storage-dtype float16" in err
    assert json.loads((out / "config.json").read_text())["groups"][0]["shared_tensors"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor(f.keys()[0]).dtype.is_floating_point and "float16" in str(
            f.get_tensor("groups.0.shared.fc.bias").dtype
        )


def test_short_m_is_method_only(capsys, tmp_path):
    assert main(["push", str(tmp_path / "missing"), "--repo", "me/x", "-m", "hello"]) == 2
    err = capsys.readouterr().err
    assert "-m is deprecated and goes away in the next release; use --message" in err
