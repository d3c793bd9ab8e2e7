"""Bad inputs through the command line: one line naming the problem and the fix, exit status 2, no
traceback, nothing written anywhere (the inputs a case names hashed by content before and after, the
rest of the world by size and time); and the faults around them (full disk, killed writes, unreachable
Hub, unreadable images, file modes, dtypes, start-up imports), and the inputs that look bad but are
good (hidden folders, upper-case .TAR, link loops, 16-bit images, escaped names)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import posthoc
from posthoc.artifact import seal
from posthoc.cli import main

from .helpers import CLASSES, QUIET, save_hub_layout, tiny_model


def _set(config: dict, dotted: str, value) -> None:
    """``config[a][b][0][c] = value`` for ``dotted`` = ``a.b.0.c``."""
    *path, last = dotted.split(".")
    for key in path:
        config = config[int(key)] if isinstance(config, list) else config[key]
    config[int(last) if isinstance(config, list) else last] = value


def _model(w: Path, name: str, src: Path, *, config=None, raw: bytes | None = None, tensors=None) -> Path:
    """A copy of the model directory ``src`` at ``w/name``: its config edited (``config``: {dotted: value},
    or a function of the dict), replaced by ``raw`` bytes, or its weights changed by ``tensors(dict)``."""
    d = w / name
    shutil.copytree(src, d)
    if config is not None:
        cfg = json.loads((d / "config.json").read_text())
        if callable(config):
            cfg = config(cfg)
        else:
            for key, value in config.items():
                _set(cfg, key, value)
        (d / "config.json").write_text(json.dumps(cfg))
    if raw is not None:
        (d / "config.json").write_bytes(raw)
    if tensors is not None:
        t = load_file(str(d / "model.safetensors"))
        tensors(t)
        save_file(t, str(d / "model.safetensors"))
    return d


def _artifact(w: Path, name: str, *, config=None, sealed: bool = True, tensors=None) -> Path:
    """A copy of the good artifact ``w/art``: weights changed by ``tensors`` (their size and SHA-256 recorded
    again, as a careful forger would), its config edited, then sealed again unless ``sealed`` is False."""

    def edit(cfg):
        if tensors is not None:
            data = (w / name / "model.safetensors").read_bytes()
            cfg["files"]["model.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        if callable(config):
            cfg = config(cfg)
        else:
            for key, value in (config or {}).items():
                _set(cfg, key, value)
        return seal(cfg) if sealed and isinstance(cfg, dict) else cfg

    d = _model(w, name, w / "art", tensors=tensors)
    cfg = edit(json.loads((d / "config.json").read_text()))
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels (a decompression bomb's first bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def world(tmp_path_factory, resnet_dir, image_data):
    """Every broken thing the table below points at, made once."""
    w = tmp_path_factory.mktemp("bad")
    (w / "noconfig").mkdir()
    (w / "noweights").mkdir()
    shutil.copy(resnet_dir / "config.json", w / "noweights" / "config.json")
    (w / "badjson").mkdir()
    (w / "badjson" / "config.json").write_text("{not json")
    shutil.copy(resnet_dir / "model.safetensors", w / "badjson" / "model.safetensors")
    (w / "badarch").mkdir()
    cfg = json.loads((resnet_dir / "config.json").read_text())
    (w / "badarch" / "config.json").write_text(json.dumps({**cfg, "architecture": "resnet9000"}))
    shutil.copy(resnet_dir / "model.safetensors", w / "badarch" / "model.safetensors")
    (w / "garbage.pth").write_bytes(os.urandom(2000))

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"w": torch.zeros(2), "x": Evil()}, w / "evil.pth")
    torch.save({"w": torch.zeros(2)}, w / "ok.pth")
    (w / "trunc.safetensors").write_bytes((resnet_dir / "model.safetensors").read_bytes()[:500])
    torch.save(tiny_model("test_efficientnet").state_dict(), w / "other_arch.pth")
    # data: empty split, an unreadable image, a truncated image, renamed classes, too few classes
    (w / "empty" / "val").mkdir(parents=True)
    for name in ("badimg", "truncimg", "renamed", "twoclasses"):
        shutil.copytree(image_data, w / name)
    (w / "badimg" / "val" / CLASSES[0] / "0000.png").write_bytes(b"this is not a png")
    png = w / "truncimg" / "val" / CLASSES[1] / "0001.png"
    png.write_bytes(png.read_bytes()[:200])
    (w / "renamed" / "val" / CLASSES[0]).rename(w / "renamed" / "val" / "disc")
    shutil.rmtree(w / "twoclasses" / "val" / CLASSES[2])
    (w / "dup.txt").write_text("circle\ncircle\nstripes\n")
    # artifacts: a good one, a damaged one, one without weights, a newer format, a directory with user files
    assert main(["ensemble", str(resnet_dir), str(resnet_dir), "--out", str(w / "art")]) == 0
    for name in ("flipped", "noweights_art", "newer", "withnotes"):
        shutil.copytree(w / "art", w / name)
    data = bytearray((w / "flipped" / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (w / "flipped" / "model.safetensors").write_bytes(bytes(data))
    (w / "noweights_art" / "model.safetensors").unlink()
    newer = json.loads((w / "newer" / "config.json").read_text())
    newer["posthoc"]["format_version"] = 99
    (w / "newer" / "config.json").write_text(json.dumps(newer))
    (w / "withnotes" / "notes.txt").write_text("my notes")
    (w / "plain_dir").mkdir()
    (w / "plain_dir" / "x.txt").write_text("x")
    save_hub_layout(tiny_model("test_resnet", num_classes=5), w / "five")
    save_hub_layout(tiny_model("test_resnet"), w / "labeled")
    labeled = json.loads((w / "labeled" / "config.json").read_text())
    labeled["pretrained_cfg"]["label_names"] = list(CLASSES)  # as the CIFAR-10 parents record them
    (w / "labeled" / "config.json").write_text(json.dumps(labeled))
    _more_world(w, resnet_dir, image_data)
    return w


def _more_world(w: Path, m: Path, d: Path) -> None:
    """The inputs of issue 30: outputs over inputs, configs that instruct, non-finite numbers, odd files."""
    secret = w / "secret.pth"
    torch.save({"x": torch.zeros(1)}, secret)
    # timm configs that are not data
    for name, config in {
        "cfg_checkpoint": {"model_args.checkpoint_path": str(secret)},
        "cfg_pretrained": {"model_args.pretrained": True},
        "cfg_overlay": {"model_args.pretrained_cfg_overlay": {"file": str(secret)}},
        "cfg_cache": {"model_args.cache_dir": str(w)},
        "cfg_features": {"model_args.features_only": True},
        "cfg_unknown": {"model_args.bogus": 1},
        "cfg_pathpool": {"model_args.global_pool": "../avg"},
        "cfg_imgsize": {"model_args.img_size": 32},  # an architecture keyword ResNet does not take
        "cfg_huge": {"model_args.num_classes": 10**9},
        "cfg_size0": {"pretrained_cfg.input_size": [3, 0, 0], "pretrained_cfg.test_input_size": [3, 0, 0]},
        "cfg_sizetext": {"pretrained_cfg.input_size": "big"},
        "cfg_std0": {"pretrained_cfg.std": [0, 0, 0]},
        "cfg_crop": {"pretrained_cfg.crop_pct": 1e-9, "pretrained_cfg.test_crop_pct": 1e-9},
        "cfg_interp": {"pretrained_cfg.interpolation": "random"},
        "cfg_classes": {"pretrained_cfg.num_classes": "3"},
        "cfg_labels": {"pretrained_cfg.label_names": ["circle", "circle", "stripes"]},
        "cfg_arch": {"architecture": "../../etc/passwd"},
        "cfg_noarch": lambda c: {"pretrained_cfg": c["pretrained_cfg"]},
    }.items():
        _model(w, name, m, config=config)
    for name, raw in {
        "cfg_list": b"[]",
        "cfg_text": b'"resnet"',
        "cfg_latin1": b"\xff\xfe{}",
        "cfg_binary": b"{\0\0}",
        "cfg_nan": (m / "config.json").read_bytes().replace(b'"mean": [', b'"mean": [NaN, '),
    }.items():
        _model(w, name, m, raw=raw)
    (w / "cfg_dir").mkdir()
    (w / "cfg_dir" / "config.json").mkdir()
    shutil.copy(m / "model.safetensors", w / "cfg_dir")
    (w / "cfg_fifo").mkdir()
    os.mkfifo(w / "cfg_fifo" / "config.json")
    shutil.copy(m / "model.safetensors", w / "cfg_fifo")

    # weights that are not numbers, or not floating point, or outputs that are not finite
    def nan(t):
        key = next(k for k in t if k.endswith("fc.weight"))  # the checkpoint's, or the artifact's stored one
        t[key].view(-1)[0] = float("nan")

    _model(w, "w_nan", m, tensors=nan)
    _model(w, "w_inf", m, tensors=lambda t: t["fc.bias"].fill_(float("inf")))
    _model(w, "w_int", m, tensors=lambda t: t.update({k: v.to(torch.int32) for k, v in t.items() if v.is_floating_point()}))
    _model(w, "w_huge", m, tensors=lambda t: t["fc.weight"].fill_(3e38))  # finite weights, infinite logits
    (w / "w_empty").mkdir()
    shutil.copy(m / "config.json", w / "w_empty")
    (w / "w_empty" / "model.safetensors").write_bytes(b"")
    save_hub_layout(tiny_model("test_vit", dynamic_img_size=False), w / "vit")  # a fixed input size
    # artifacts whose config.json is edited (sealed again: the edit must still be caught by the field checks)
    for name, config in {
        "a_temp": {"combine.temperature": "hot"},
        "a_temp0": {"combine.temperature": 0},
        "a_rule": {"combine.rule": "median"},
        "a_views": {"combine.views": ["hflip"]},
        "a_fv_text": {"posthoc.format_version": "1"},
        "a_fv_zero": {"posthoc.format_version": 0},
        "a_members": {"num_members": 5},
        "a_group": {"members.0.group": 7},
        "a_groups": {"groups": []},
        "a_classes": {"num_classes": 5},
        "a_metric": {"metrics": {"val:select": {"top1": "high"}}},
        "a_select": {"data": {"select_size": "many"}},
        "a_digests": {"data": {"tuned_images": {"count": 1, "digests": "not hex"}}},
        "a_sha": lambda c: {**c, "files": {"model.safetensors": {**c["files"]["model.safetensors"], "sha256": "abc"}}},
        "a_checkpoint": {"groups.0.timm_config.model_args.checkpoint_path": str(secret)},
        "a_section": {"posthoc": ["format_version", 1]},
        "a_list": lambda c: [c],
    }.items():
        _artifact(w, name, config=config)
    _artifact(w, "a_tampered", config={"num_classes": 3, "command": "edited"}, sealed=False)
    _artifact(w, "a_nan", tensors=nan)  # its checksum recorded again: only the values tell
    (w / "a_nanjson").mkdir()
    shutil.copy(w / "art" / "model.safetensors", w / "a_nanjson")
    (w / "a_nanjson" / "config.json").write_text(
        (w / "art" / "config.json").read_text().replace('"temperature": 1.0', '"temperature": NaN')
    )
    # outputs over inputs
    (w / "rdir.json").mkdir()
    os.mkfifo(w / "fifo.json")
    (w / "notes.json").write_text('{"my": "notes"}')
    (w / "user.safetensors").write_bytes(b"user data")
    (w / "afile").write_text("a file, not a directory")
    (w / "mlink").symlink_to(m, target_is_directory=True)
    (w / "map.json").write_text("circle\nsquare\nstripes\n")
    (w / "s.safetensors").write_bytes(b"not read before the outputs are checked")
    # data and label files
    (w / "latin1.txt").write_bytes("circle\nsquäre\n".encode("latin-1"))
    os.mkfifo(w / "fifo.txt")
    (w / "five.txt").write_text("circle\nsquare\nstripes\ndisc\nstar\n")
    (w / "empty.txt").write_text("")
    (w / "binary.txt").write_bytes(b"circle\0square\0stripes")
    (w / "valid_words.txt").write_text("zero\none\ntwo\n")
    (w / "real_nan.json").write_text("[[0], [NaN]]")
    (w / "real_text.json").write_text('[["a"]]')
    (w / "ctrl.txt").write_text("circle\x1b[2J\nsquare\nstripes\n")
    for name in ("emptyclass", "noclasses", "bomb", "newline"):
        shutil.copytree(d, w / name)
    (w / "emptyclass" / "val" / "disc").mkdir()
    shutil.rmtree(w / "noclasses" / "val")
    (w / "noclasses" / "val").mkdir()
    (w / "noclasses" / "val" / "0000.png").write_bytes((d / "val" / CLASSES[0] / "0000.png").read_bytes())
    (w / "bomb" / "val" / CLASSES[0] / "0000.png").write_bytes(_png_claiming(40000, 40000))
    (w / "newline" / "val" / CLASSES[0]).rename(w / "newline" / "val" / "circ\nle")
    with tarfile.open(w / "val.tar.gz", "w:gz") as tf:
        tf.add(d / "val" / CLASSES[0], CLASSES[0])
    (w / "data.zip").write_bytes(b"PK\x03\x04 not really")
    (w / "bad.tar").write_bytes(os.urandom(3000))
    os.mkfifo(w / "fifo_data")


# (arguments, key words of the one line); {m} the tiny model, {d} its data, {w} the broken things, {o} --out
CASES = [
    # models
    (["eval", "resnet5O", "--data", "{d}"], "unknown model 'resnet5O'; did you mean"),
    (["eval", "resnet18.no_such_tag", "--data", "{d}"], "unknown pretrained tag 'no_such_tag'"),
    (["eval", "{w}/nowhere/x", "--data", "{d}"], "neither an existing path nor a timm name"),
    (["eval", "{w}/noconfig", "--data", "{d}"], "has no config.json"),
    (["eval", "{w}/noweights", "--data", "{d}"], "has no weights file"),
    (["eval", "{w}/badjson", "--data", "{d}"], "is not valid JSON"),
    (["eval", "{w}/badarch", "--data", "{d}"], "names unknown architecture 'resnet9000'"),
    (["eval", "{m}/model.safetensors", "--data", "{d}"], "bare weights file; also pass --arch"),
    (["eval", "{w}/ok.pth", "--arch", "resnet9000", "--data", "{d}"], "unknown architecture 'resnet9000'"),
    (["eval", "{w}/garbage.pth", "--arch", "test_resnet", "--data", "{d}"], "corrupt, truncated or not a PyTorch"),
    (["eval", "{w}/evil.pth", "--arch", "test_resnet", "--data", "{d}"], "refuses to unpickle for safety"),
    (["eval", "{w}/trunc.safetensors", "--arch", "test_resnet", "--data", "{d}"], "cannot read weights file"),
    (["eval", "{w}/other_arch.pth", "--arch", "test_resnet", "--data", "{d}"], "do not fit architecture 'test_resnet'"),
    (["eval", "hf-hub:nobody/nothing", "--data", "{d}"], "not in the local Hugging Face cache"),
    (["eval", "{m}", "--data", "{d}", "--num-classes", "5"], "would give .* a new, untrained classifier"),
    # data
    (["eval", "{m}", "--data", "{w}/nowhere"], "data directory .* does not exist"),
    (["eval", "{m}", "--data", "{d}", "--split", "test"], "split 'test' not found"),
    (["eval", "{m}", "--data", "{d}", "--split", "val:middle"], "unknown split part 'middle'"),
    (["eval", "{m}", "--data", "{w}/empty"], "no images in"),
    (["eval", "{m}", "--data", "{w}/badimg"], "cannot read image .*0000.png.*--skip-bad-images"),
    (["eval", "{m}", "--data", "{w}/truncimg"], "cannot read image .*0001.png"),
    (
        ["eval", "{w}/labeled", "--data", "{w}/renamed"],
        "do not match the model's label names: disc is not among them.*--class-map",
    ),
    (["eval", "{m}", "--data", "{w}/renamed", "--class-map", "{w}/nowhere.txt"], "class map .* does not exist"),
    (["eval", "{m}", "--data", "{w}/renamed", "--class-map", "{w}/dup.txt"], "must list each class name once"),
    (["eval", "{m}", "--data", "{w}/twoclasses"], "predicts 3 classes but the data has 2 classes"),
    (["eval", "{w}/five", "--data", "{d}"], "predicts 5 classes but the data has 3 classes"),
    # options
    (["eval", "{m}", "--data", "{d}", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["eval", "{m}", "--data", "{d}", "--workers", "-1"], "--workers must be at least 0"),
    (["eval", "{m}", "--data", "{d}", "--subset", "0"], "--subset must be at least 1"),
    (["eval", "{m}", "--data", "{d}", "--select-size", "0"], "--select-size must be at least 1"),
    (["eval", "{m}", "--data", "{d}", "--split", "val:report", "--select-size", "999"], "must be between 1 and 59"),
    (["eval", "{m}", "--data", "{d}", "--mean", "0.5,0.5"], "one value per color channel"),
    (["eval", "{m}", "--data", "{d}", "--mean", "half"], "comma-separated numbers"),
    (["eval", "{m}", "--data", "{d}", "--std", "0,0,0"], "--std values must be positive"),
    (["eval", "{m}", "--data", "{d}", "--img-size", "0"], "--img-size must be at least 1"),
    (["eval", "{m}", "--data", "{d}", "--crop-pct", "-1"], "--crop-pct must be at least 0.1"),
    (["eval", "{m}", "--data", "{d}", "--crop-pct", "0"], "--crop-pct must be at least 0.1"),
    (["eval", "{m}", "--data", "{d}", "--interpolation", "fancy"], "--interpolation must be one of"),
    (["eval", "{m}", "--data", "{d}", "--device", "cuda"], "no CUDA GPU is available; use --device cpu"),
    (["eval", "{m}", "--data", "{d}", "--device", "tpu"], "unknown device 'tpu'"),
    (["eval", "{m}", "--data", "{d}", "--model-dtype", "float8"], "--model-dtype must be one of float32, float16, bfloat16"),
    (["eval", "{m}", "--data", "{d}", "--results-file", "{o}/r.txt"], "must end in .json or .csv"),
    (["eval", "{m}", "--data", "{d}", "--bogus"], "No such option: --bogus"),
    # boost
    (["boost", "{m}", "--method", "noisey", "--data", "{d}", "--out", "{o}"], "unknown method 'noisey'"),
    (
        ["boost", "{m}", "--method", "noisy", "--data", "{d}", "--out", "{o}", "--last-layers", "99"],
        "--last-layers 99 is more than this model has",
    ),
    (["boost", "{m}", "--method", "noisy", "--data", "{d}", "--out", "{o}", "--members", "0"], "--members must be at least 1"),
    (
        ["boost", "{m}", "--method", "noisy", "--data", "{d}", "--out", "{o}", "--include-parent", "false"],
        "looks like a value for an on/off option",
    ),
    (["boost", "{m}", "--method", "noisy", "--data", "{d}", "--out", "{w}/art"], "already exists; pass --overwrite"),
    (
        ["boost", "{m}", "--method", "noisy", "--data", "{d}", "--out", "{w}/withnotes", "--overwrite"],
        "also holds files posthoc did not write \\(notes.txt\\)",
    ),
    (["boost", "{m}", "--method", "noisy", "--data", "{d}", "--out", "{w}/plain_dir", "--overwrite"], "replaces artifacts only"),
    (
        ["boost", "{w}/art", "--method", "noisy", "--data", "{d}", "--out", "{o}"],
        "is an ensemble artifact; start from a checkpoint",
    ),
    (
        ["boost", "{m}", "--method", "noisy", "--data", "{d}", "--out", "{o}", "--inference-budget", "0.5"],
        "--inference-budget must be at least 1",
    ),
    (
        ["boost", "{m}", "--method", "noisy", "--data", "{d}", "--out", "{o}", "--target-kl", "-1"],
        "--target-kl must be more than 0",
    ),
    (
        ["boost", "{m}", "--method", "noisy", "--data", "{d}", "--out", "{o}", "--storage-dtype", "float8"],
        "--storage-dtype must be one of auto",
    ),
    (
        ["boost", "{m}", "--method", "resample", "--data", "{d}", "--out", "{o}", "--stats", "{w}/no.safetensors"],
        "does not exist; write one with --save-stats",
    ),
    (["boost", "{m}", "--method", "noisy", "--data", "{d}", "--out", "{o}", "--batch-size", "8"], "No such option: --batch-size"),
    # artifacts, Hub, other commands
    (["info", "{w}/nowhere"], "artifact .* does not exist"),
    (["info", "{w}/flipped"], "does not match the SHA-256"),
    (["info", "{w}/noweights_art"], "has no model.safetensors"),
    (["eval", "{w}/newer", "--data", "{d}"], "newer than this posthoc reads"),
    (["ensemble", "{m}", "--out", "{o}"], "at least two models"),
    (["ensemble", "{m}", "{w}/five", "--out", "{o}"], "must share a label space"),
    (["push", "{w}/art", "--repo", "not-a-repo-id"], "is not a Hub repository id"),
    (["distill", "{m}", "--data", "{d}", "--out", "{o}"], "is not an ensemble artifact"),
    (["calibrate", "{w}/labeled", "--data", "{w}/renamed", "--out", "{o}"], "do not match the model's label names"),
    # ---- issue 30: outputs never touch inputs
    (["eval", "{w}/labeled", "--data", "{d}", "--results-file", "{w}/labeled/config.json"], "lies inside the input"),
    (["eval", "{m}", "--data", "{d}", "--results-file", "{d}/val/r.json"], "results file .* lies inside the input"),
    (["eval", "{m}", "--data", "{d}", "--class-map", "{w}/map.json", "--results-file", "{w}/map.json"], "is the input"),
    (["eval", "{m}", "--data", "{d}", "--results-file", "{w}/mlink/r.json"], "lies inside the input"),
    (["eval", "{m}", "--data", "{d}", "--results-file", "{w}/notes.json"], "already exists and is not one posthoc wrote"),
    (["eval", "{m}", "--data", "{d}", "--results-file", "{w}/rdir.json"], "is a directory; name the file"),
    (["eval", "{m}", "--data", "{d}", "--results-file", "{w}/fifo.json"], "exists and is not a regular file"),
    (["eval", "{m}", "--data", "{d}", "--results-file", "{w}/afile/r.json"], "is a file, not a directory"),
    (["eval", "{m}", "{w}/labeled", "--data", "{d}", "--results-file", "{w}/labeled/r.json"], "lies inside the input"),
    (["eval", "{m}", "--data", "{w}/empty", "--results-file", "{o}/r.json"], "no images in"),
    (
        [
            "boost",
            "{w}/labeled",
            "--method",
            "resample",
            "--data",
            "{d}",
            "--out",
            "{o}",
            "--save-stats",
            "{w}/labeled/model.safetensors",
        ],
        "--save-stats file .* lies inside the input",
    ),
    (
        ["boost", "{m}", "--method", "resample", "--data", "{d}", "--out", "{o}", "--save-stats", "{o}/stats.safetensors"],
        "lies inside the artifact directory",
    ),
    (
        ["boost", "{m}", "--method", "resample", "--data", "{d}", "--out", "{o}", "--save-stats", "{w}/user.safetensors"],
        "already exists and is not one posthoc wrote",
    ),
    (
        ["boost", "{m}", "--method", "resample", "--data", "{d}", "--out", "{w}/s.safetensors", "--stats", "{w}/s.safetensors"],
        "is the input",
    ),
    (["boost", "{m}", "--method", "noisy", "--data", "{d}", "--out", "{d}"], "artifact directory .* is the input"),
    (["boost", "{m}", "--method", "noisy", "--data", "{d}", "--out", "{d}/val/new"], "lies inside the input"),
    (["boost", "{w}/labeled", "--method", "noisy", "--data", "{d}", "--out", "{w}"], "contains the input"),
    (["boost", "{m}", "--method", "noisy", "--data", "{d}", "--out", "{w}/mlink"], "is the input"),
    (["calibrate", "{w}/labeled", "--data", "{d}", "--out", "{w}/labeled/cal"], "lies inside the input"),
    (["distill", "{w}/art", "--data", "{d}", "--out", "{w}/art"], "is the input"),
    (["export", "{w}/art", "--out", "{w}/art/model.onnx"], "lies inside the input"),
    (["ensemble", "{w}/labeled", "{m}", "--out", "{w}/labeled"], "is the input"),
    # ---- configs are data, not instructions
    (["eval", "{w}/cfg_checkpoint", "--data", "{d}"], "model_args.checkpoint_path must be absent"),
    (["eval", "{w}/cfg_pretrained", "--data", "{d}"], "model_args.pretrained must be absent"),
    (["eval", "{w}/cfg_overlay", "--data", "{d}"], "model_args.pretrained_cfg_overlay must be absent"),
    (["eval", "{w}/cfg_cache", "--data", "{d}"], "model_args.cache_dir must be absent"),
    (["eval", "{w}/cfg_features", "--data", "{d}"], "model_args.features_only must be absent"),
    (["eval", "{w}/cfg_unknown", "--data", "{d}"], "model_args.bogus must be absent"),
    (["eval", "{w}/cfg_pathpool", "--data", "{d}"], "model_args.global_pool must be .*without a path separator"),
    (["eval", "{w}/cfg_imgsize", "--data", "{d}"], "timm cannot build 'test_resnet' from it"),
    (["eval", "{w}/cfg_huge", "--data", "{d}"], "describes a test_resnet of .* numbers but its weights hold"),
    (["eval", "{w}/cfg_size0", "--data", "{d}"], "field pretrained_cfg.input_size\\[1\\] must be a whole number at least 1"),
    (["eval", "{w}/cfg_sizetext", "--data", "{d}"], "field pretrained_cfg.input_size must be a list of 3 items"),
    (["eval", "{w}/cfg_std0", "--data", "{d}"], "field pretrained_cfg.std\\[0\\] must be a finite number at least 0.001"),
    (["eval", "{w}/cfg_crop", "--data", "{d}"], "field pretrained_cfg.crop_pct must be a finite number at least 0.1"),
    (["eval", "{w}/cfg_interp", "--data", "{d}"], "field pretrained_cfg.interpolation must be one of"),
    (["eval", "{w}/cfg_classes", "--data", "{d}"], "field pretrained_cfg.num_classes must be a whole number"),
    (["eval", "{w}/cfg_labels", "--data", "{d}"], "field pretrained_cfg.label_names must be without repeats"),
    (["eval", "{w}/cfg_arch", "--data", "{d}"], "field architecture must be a timm architecture name"),
    (["eval", "{w}/cfg_noarch", "--data", "{d}"], "field architecture must be present"),
    (["eval", "{w}/cfg_list", "--data", "{d}"], "must hold a JSON object \\(a timm model config\\), not a list"),
    (["eval", "{w}/cfg_text", "--data", "{d}"], "must hold a JSON object .*not text"),
    (["eval", "{w}/cfg_latin1", "--data", "{d}"], "model config .* is not UTF-8 text \\(byte 0xff at offset 0\\)"),
    (["eval", "{w}/cfg_binary", "--data", "{d}"], "holds NUL bytes"),
    (["eval", "{w}/cfg_nan", "--data", "{d}"], "holds NaN, which is not a number JSON can hold"),
    (["eval", "{w}/cfg_dir", "--data", "{d}"], "model config .*config.json is a directory"),
    (["eval", "{w}/cfg_fifo", "--data", "{d}"], "model config .*config.json is a FIFO, not a regular file"),
    (["ensemble", "{w}/cfg_checkpoint", "{m}", "--out", "{o}"], "model_args.checkpoint_path must be absent"),
    (["calibrate", "{w}/cfg_overlay", "--data", "{d}", "--out", "{o}"], "model_args.pretrained_cfg_overlay must be absent"),
    (["info", "{w}/a_checkpoint"], "field groups\\[0\\].timm_config.model_args.checkpoint_path must be absent"),
    (["eval", "{w}/a_checkpoint", "--data", "{d}"], "model_args.checkpoint_path must be absent"),
    (["eval", "{w}/a_temp", "--data", "{d}"], 'field combine.temperature must be a finite number .*got "hot"'),
    (["info", "{w}/a_temp0"], "field combine.temperature must be a finite number at least 1e-06"),
    (["info", "{w}/a_rule"], "field combine.rule must be one of"),
    (["eval", "{w}/a_views", "--data", "{d}"], "test-time views must be 'identity' followed by"),
    (["eval", "{w}/a_fv_text", "--data", "{d}"], 'field posthoc.format_version must be a whole number, got "1"'),
    (["info", "{w}/a_fv_zero"], "field posthoc.format_version must be a whole number, got 0"),
    (["info", "{w}/a_members"], "num_members \\(5\\), members \\(2\\) and the groups' members \\(2\\) disagree"),
    (["info", "{w}/a_group"], "a member names a group that does not exist"),
    (["info", "{w}/a_groups"], "field groups must be a list of at least 1 items"),
    (["info", "{w}/a_classes"], "num_classes \\(5\\) disagrees with its groups' \\(3\\)"),
    (["info", "{w}/a_metric"], 'field metrics.val:select.top1 must be a finite number or null, got "high"'),
    (["eval", "{w}/a_select", "--data", "{d}"], 'field data.select_size must be a whole number at least 1 or null, got "many"'),
    (["info", "{w}/a_digests"], "field data.tuned_images.digests must be hex digests"),
    (["info", "{w}/a_sha"], "field files.model.safetensors.sha256 must be a SHA-256 in hex"),
    (["info", "{w}/a_section"], "is not a posthoc artifact \\(config.json has no 'posthoc' section\\)"),
    (["eval", "{w}/a_list", "--data", "{d}"], "must hold a JSON object \\(a timm model config\\), not a list"),
    (["info", "{w}/a_tampered"], "does not match the SHA-256 of its integrity record: it was edited or damaged"),
    (["eval", "{w}/a_tampered", "--data", "{d}"], "does not match the SHA-256 of its integrity record"),
    (["info", "{w}/a_nanjson"], "artifact config .* holds NaN"),
    (["info", "{w}/ok.pth"], "is a file, not an artifact directory"),
    # ---- numbers are checked: weights, outputs, options
    (
        ["eval", "{w}/w_nan", "--data", "{d}"],
        "holds 1 non-finite value\\(s\\) \\(NaN or infinity\\) in 1 tensor\\(s\\), first fc.weight",
    ),
    (["eval", "{w}/w_inf", "--data", "{d}"], "holds 3 non-finite value\\(s\\)"),
    (["info", "{w}/a_nan"], "holds 1 non-finite value\\(s\\)"),
    (["eval", "{w}/a_nan", "--data", "{d}"], "non-finite value"),
    (["ensemble", "{w}/w_nan", "{m}", "--out", "{o}"], "non-finite value"),
    (["calibrate", "{w}/w_inf", "--data", "{d}", "--out", "{o}"], "non-finite value"),
    (["eval", "{w}/w_int", "--data", "{d}"], "conv1.0.weight stored as int32 for a float32 tensor"),
    (["eval", "{w}/w_empty", "--data", "{d}"], "cannot read weights file .*corrupt, truncated"),
    (["eval", "{w}/w_huge", "--data", "{d}"], "gave non-finite outputs \\(NaN or infinity\\) for 60 of 60 images, so no metric"),
    (["eval", "{w}/w_huge", "--data", "{d}", "--tta", "flip"], "non-finite outputs .* for 60 of 60 images"),
    (["eval", "{w}/vit", "--data", "{d}", "--img-size", "48"], "cannot run on inputs of 3x48x48"),
    (["eval", "{m}", "--data", "{d}", "--img-size", "100000"], "--img-size must be at most 4096"),
    (["eval", "{m}", "--data", "{d}", "--crop-pct", "1e-9"], "--crop-pct must be at least 0.1"),
    (["eval", "{m}", "--data", "{d}", "--crop-pct", "nan"], "--crop-pct must be a finite number, got 'nan'"),
    (["eval", "{m}", "--data", "{d}", "--crop-pct", "inf"], "--crop-pct must be a finite number, got 'inf'"),
    (["eval", "{m}", "--data", "{d}", "--crop-pct", "3"], "--crop-pct must be at most 2"),
    (["eval", "{m}", "--data", "{d}", "--mean", "nan,nan,nan"], "--mean must be finite numbers"),
    (["eval", "{m}", "--data", "{d}", "--mean", "1e30,0,0"], "--mean values must be between -10 and 10"),
    (["eval", "{m}", "--data", "{d}", "--mean", "123.7,116.3,103.5"], "--mean values must be between -10 and 10 .*0.485"),
    (["eval", "{m}", "--data", "{d}", "--std", "58.4,57.1,57.4"], "--std values must be between 0.001 and 10"),
    (["eval", "{m}", "--data", "{d}", "--std", "1e-300"], "--std values must be between 0.001 and 10"),
    (["eval", "{m}", "--data", "{d}", "--std", "inf"], "--std must be finite numbers"),
    (["eval", "{m}", "--data", "{d}", "--mean", "0.5,,0.5"], "--mean must be comma-separated numbers"),
    (["eval", "{m}", "--data", "{d}", "--interpolation", "random"], "--interpolation must be one of"),
    (["eval", "{m}", "--data", "{d}", "--batch-size", "1e3"], "Invalid value for '--batch-size'"),
    (["eval", "{m}", "--data", "{d}", "--subset", "-3"], "--subset must be at least 1"),
    (["eval", "{m}", "--data", "{d}", "--split", "val:report", "--select-size", "1000000000"], "must be between 1 and 59"),
    (["eval", "{m}", "--data", "{d}", "--tta", "auto"], "eval scores a model as it is and never tunes"),
    (
        ["boost", "{m}", "--method", "noisy", "--data", "{d}", "--out", "{o}", "--inference-budget", "inf"],
        "--inference-budget must be a finite number",
    ),
    (
        ["boost", "{m}", "--method", "noisy", "--data", "{d}", "--out", "{o}", "--inference-budget", "nan"],
        "--inference-budget must be a finite number",
    ),
    (
        ["boost", "{m}", "--method", "noisy", "--data", "{d}", "--out", "{o}", "--target-kl", "nan"],
        "--target-kl must be a finite number",
    ),
    (
        ["boost", "{m}", "--method", "noisy", "--data", "{d}", "--out", "{o}", "--distill-epochs", "inf"],
        "--distill-epochs must be a finite number",
    ),
    (["boost", "{m}", "--method", "resample", "--data", "{d}", "--out", "{o}", "--lr", "inf"], "--lr must be a finite number"),
    (
        ["boost", "{m}", "--method", "resample", "--data", "{d}", "--out", "{o}", "--momentum", "1"],
        "--momentum must be less than 1",
    ),
    (
        ["boost", "{m}", "--method", "resample", "--data", "{d}", "--out", "{o}", "--batch-size", "1", "--epochs", "0.01"],
        "a batch of one image cannot train a model with BatchNorm; use --batch-size 2 or more",
    ),
    (
        ["boost", "{m}", "--method", "noisy", "--data", "{d}", "--out", "{o}", "--seed", "99999999999999999999"],
        "--seed must be at most 4294967295",
    ),
    (["distill", "{w}/art", "--data", "{d}", "--out", "{o}", "--seed", "-1"], "--seed must be at least 0, got -1"),
    (["eval", "{m}", "{w}/labeled", "--data", "{d}", "--sort", "model"], "--sort must be one of top1, top1_err"),
    # ---- data and label files read as their users mean them
    (["eval", "{m}", "--data", "{d}", "--split", "../data/val"], "split '../data/val' is not a split name"),
    (["eval", "{m}", "--data", "{d}", "--split", "val/../val"], "is not a split name"),
    (["eval", "{m}", "--data", "{d}", "--split", ".."], "split '..' is not a split name"),
    (["eval", "{m}", "--data", "{d}", "--split", ".hidden"], "is not a split name"),
    (["eval", "{m}", "--data", "{d}", "--split", ""], "split '' is empty"),
    (["eval", "{m}", "--data", "{d}", "--split", "val\x1b[31m:report"], "split 'val\\\\x1b\\[31m' is not a split name"),
    (["boost", "{m}", "--method", "noisy", "--data", "{d}", "--out", "{o}", "--train-split", "../x"], "is not a split name"),
    (["calibrate", "{m}", "--data", "{d}", "--out", "{o}", "--val-split", "/etc"], "is not a split name"),
    (["eval", "{m}", "--data", "{w}/emptyclass"], "no images in class folder\\(s\\) disc of"),
    (["eval", "{m}", "--data", "{w}/noclasses"], "found no class folders"),
    (["eval", "{m}", "--data", "{w}/val.tar.gz"], "is a compressed archive, which posthoc does not read; extract it"),
    (["eval", "{m}", "--data", "{w}/data.zip"], "is a compressed archive"),
    (["eval", "{m}", "--data", "{w}/garbage.pth"], "--data .*garbage.pth is a file, not a data directory or a .tar"),
    (["eval", "{m}", "--data", "{w}/fifo_data"], "is a FIFO, socket or device, not a data directory"),
    (["eval", "{m}", "--data", "{w}/bad.tar"], "cannot read .*bad.tar as a tar of class folders"),
    (
        ["eval", "{m}", "--data", "{w}/bomb"],
        "cannot read image .*0000.png \\(Image size \\(1600000000 pixels\\).*decompression bomb",
    ),
    (["eval", "{w}/labeled", "--data", "{w}/newline"], "circ\\\\nle is not among them"),
    (["eval", "{m}", "--data", "{d}", "--class-map", "{w}/latin1.txt"], "class map .* is not UTF-8 text \\(byte 0xe4"),
    (["eval", "{m}", "--data", "{d}", "--class-map", "{w}/fifo.txt"], "class map .* is a FIFO, not a regular file"),
    (["eval", "{m}", "--data", "{d}", "--class-map", "{w}"], "class map .* is a directory; name the file itself"),
    (
        ["eval", "{m}", "--data", "{d}", "--class-map", "{w}/five.txt"],
        "the model predicts 3 classes but the class map .*five.txt lists 5",
    ),
    (["eval", "{m}", "--data", "{d}", "--class-map", "{w}/empty.txt"], "must list each class name once"),
    (["eval", "{m}", "--data", "{d}", "--class-map", "{w}/binary.txt"], "holds NUL bytes: it is a binary file"),
    (["eval", "{m}", "--data", "{d}", "--class-map", "{w}/ctrl.txt"], "classes circle of the data are not in the class map"),
    (["eval", "{m}", "--data", "{d}", "--model-list", "{w}/latin1.txt"], "model list .* is not UTF-8 text"),
    (["eval", "{m}", "--data", "{d}", "--model-list", "{w}"], "model list .* is a directory"),
    (["eval", "--data", "{d}", "--model-list", "{w}/empty.txt"], "no model to evaluate"),
    (["eval", "{m}", "--data", "{d}", "--valid-labels", "{w}"], "--valid-labels file .* is a directory"),
    (["eval", "{m}", "--data", "{d}", "--valid-labels", "{w}/fifo.txt"], "--valid-labels file .* is a FIFO"),
    (["eval", "{m}", "--data", "{d}", "--valid-labels", "{w}/valid_words.txt"], "must hold one class index per line"),
    (["eval", "{m}", "--data", "{d}", "--real-labels", "{w}/real_nan.json"], "--real-labels file .* holds NaN"),
    (["eval", "{m}", "--data", "{d}", "--real-labels", "{w}/real_text.json"], "must be a JSON list of label lists"),
    (["eval", "{m}", "--data", "{d}", "--real-labels", "{w}/nowhere.json"], "--real-labels file .* does not exist"),
    (["eval", "hf-hub:../etc", "--data", "{d}"], "'hf-hub:../etc' is not a Hub repository id"),
    (["eval", "hf-hub:a/b/c", "--data", "{d}"], "is not a Hub repository id"),
    (["eval", "hf-hub:org/na me", "--data", "{d}"], "is not a Hub repository id"),
    (["info", "hf-hub:org/name@../../x"], "is not a Hub revision"),
    (["push", "{w}/art", "--repo", "org/name", "--with-export", "{w}/fifo.txt"], "export .* is a FIFO"),
    (["eval", "{w}/\x1b[31mred", "--data", "{d}"], "\\\\x1b\\[31mred"),
]


def _contents(*roots: Path) -> dict[str, str]:
    """Every entry under ``roots`` (links not followed): a regular file by the SHA-256 of its bytes, a
    directory, link, FIFO or other entry by its kind (and a link by its target)."""
    out = {}
    for root in roots:
        if root.is_symlink():
            out[str(root)] = f"link {os.readlink(root)}"
        for top, dirs, files in os.walk(root):
            out[top] = "dir"
            for name in dirs + files:
                path = os.path.join(top, name)
                mode = os.lstat(path).st_mode
                if stat.S_ISREG(mode):
                    with open(path, "rb") as f:
                        out[path] = hashlib.sha256(f.read()).hexdigest()
                elif stat.S_ISLNK(mode):
                    out[path] = f"link {os.readlink(path)}"
                elif not stat.S_ISDIR(mode):
                    out[path] = f"mode {stat.S_IFMT(mode):o}"
    return out


def _stats(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every entry under ``root`` by kind, size and modification time (cheap: the world is large)."""
    out = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            st = os.lstat(os.path.join(top, name))
            out[os.path.join(top, name)] = (stat.S_IFMT(st.st_mode), st.st_size, st.st_mtime_ns)
    return out


def _named(args: list[str], world: Path) -> list[Path]:
    """The entries of the world a case names (``{w}/NAME/...`` -> ``world/NAME``)."""
    names = {a.split("{w}/", 1)[1].split("/", 1)[0] for a in args if "{w}/" in a}
    return [world / n for n in sorted(names) if (world / n).exists() or (world / n).is_symlink()]


WITH_WORKERS = ("eval", "boost", "calibrate", "distill")  # commands with --workers: no loader processes in tests


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a[:4]) + f" #{i}" for i, (a, _) in enumerate(CASES)])
def test_bad_input_gets_one_line(tmp_path, capsys, monkeypatch, world, resnet_dir, image_data, args, message):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    argv = [a.format(m=resnet_dir, d=image_data, w=world, o=out) for a in args]
    argv += ["--no-progress"] if args[0] in ("eval", "boost") else []
    argv += ["--workers", "0"] if args[0] in WITH_WORKERS and "--workers" not in args else []
    named = [resnet_dir, image_data, tmp_path, *_named(args, world)]
    before, around = _contents(*named), _stats(world)
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert code == 2, captured.err
    assert "Traceback" not in captured.err + captured.out, captured.err
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err  # one line, and nothing else on stderr
    text = lines[0]
    assert re.search(message, text), text
    assert _contents(*named) == before  # nothing written, nothing removed, nothing changed in what the case names
    assert _stats(world) == around  # nor anywhere else
    assert not out.exists()


def test_there_are_at_least_150_cases():
    assert len(CASES) >= 150


# ------------------------------------------------------------------------------------------ faults
def test_full_disk_leaves_the_previous_artifact_intact(tmp_path, capsys, monkeypatch, resnet_dir):
    import posthoc.artifact

    out = tmp_path / "art"
    assert main(["ensemble", str(resnet_dir), str(resnet_dir), "--out", str(out)]) == 0
    before = (out / "model.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(posthoc.artifact, "save_file", full)
    assert main(["ensemble", str(resnet_dir), str(resnet_dir), "--out", str(out), "--overwrite"]) == 2
    assert "no space left on the device while writing the artifact" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temporary directory left behind


def test_unwritable_output_is_refused_before_any_work(tmp_path, capsys, monkeypatch, resnet_dir, image_data):
    import posthoc.paths

    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(posthoc.paths.os, "access", lambda p, mode: False if Path(p) == locked else real(p, mode))
    import posthoc.commands.boost
    import posthoc.commands.eval

    calls = []
    for module in (posthoc.commands.boost, posthoc.commands.eval):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: calls.append(a))
    for argv in (
        ["boost", str(resnet_dir), "--method", "noisy", "--data", str(image_data), "--out", str(locked / "a")],
        ["eval", str(resnet_dir), "--data", str(image_data), "--results-file", str(locked / "r.json")],
    ):
        assert main(argv) == 2
        assert "is not writable; choose another location" in capsys.readouterr().err
    assert not calls  # refused before loading anything


def test_permission_denied_while_writing_is_one_line(tmp_path, capsys, monkeypatch, resnet_dir):
    import posthoc.artifact

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "x"))

    monkeypatch.setattr(posthoc.artifact, "save_file", denied)
    assert main(["ensemble", str(resnet_dir), str(resnet_dir), "--out", str(tmp_path / "a")]) == 2
    assert "permission denied while writing the artifact" in capsys.readouterr().err


def test_stale_temporary_directories_of_dead_processes_are_removed(tmp_path, resnet_dir):
    dead = tmp_path / ".art.tmp-999999-deadbeef"
    alive = tmp_path / f".art.tmp-{os.getpid()}-cafecafe"
    foreign = tmp_path / ".art.tmp-notmine"
    for d in (dead, alive, foreign):
        d.mkdir()
    assert main(["ensemble", str(resnet_dir), str(resnet_dir), "--out", str(tmp_path / "art")]) == 0
    assert not dead.exists() and alive.exists() and foreign.exists()


def test_artifact_files_get_the_usual_mode_and_keep_the_parent_dtype(tmp_path, resnet_dir):
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(resnet_dir / "config.json", half / "config.json")
    from safetensors.torch import load_file, save_file

    save_file(
        {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(resnet_dir / "model.safetensors")).items()},
        str(half / "model.safetensors"),
    )
    assert main(["ensemble", str(half), str(resnet_dir), "--out", str(tmp_path / "mixed")]) == 0
    assert main(["ensemble", str(half), str(half), "--out", str(tmp_path / "h")]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for name in ("model.safetensors", "config.json", "README.md"):
        assert (tmp_path / "h" / name).stat().st_mode & 0o777 == 0o666 & ~umask
    stored = load_file(str(tmp_path / "h" / "model.safetensors"))
    assert all(t.dtype == torch.float16 for t in stored.values() if t.is_floating_point())
    mixed = load_file(str(tmp_path / "mixed" / "model.safetensors"))
    assert any(t.dtype == torch.float32 for t in mixed.values())  # the widest of the parents' dtypes
    half2 = tmp_path / "half2"  # a second half-precision parent: members differ in every layer
    shutil.copytree(half, half2)
    save_file(
        {k: v * 1.01 if v.is_floating_point() else v for k, v in load_file(str(half / "model.safetensors")).items()},
        str(half2 / "model.safetensors"),
    )
    assert main(["ensemble", str(half), str(half2), "--out", str(tmp_path / "h2")]) == 0
    with torch.no_grad():
        x = torch.randn(2, 3, 32, 32)
        for art in ("h", "h2"):
            assert posthoc.load(tmp_path / art)(x).dtype == torch.float32  # loaded for float32 inference, as timm does


def test_skip_bad_images_counts_and_goes_on(tmp_path, capsys, world, resnet_dir):
    results = tmp_path / "r.json"
    assert (
        main(
            [
                "eval",
                str(resnet_dir),
                "--data",
                str(world / "badimg"),
                "--skip-bad-images",
                *QUIET,
                "--results-file",
                str(results),
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "skipped unreadable image" in err and "skipped 1 unreadable image(s)" in err
    r = json.loads(results.read_text())
    assert r["images"] == 59 and r["skipped_images"] == 1
    assert "NaN" not in results.read_text() and any(b["confidence"] is None for b in r["reliability"])  # JSON null


def test_class_map_maps_renamed_folders(tmp_path, capsys, world, resnet_dir, image_data):
    mapping = tmp_path / "map.txt"
    mapping.write_text("disc\nsquare\nstripes\n")  # the data's names, in the model's class order
    common = [*QUIET, "--results-file"]
    assert (
        main(
            [
                "eval",
                str(resnet_dir),
                "--data",
                str(world / "renamed"),
                "--class-map",
                str(mapping),
                *common,
                str(tmp_path / "a.json"),
            ]
        )
        == 0
    )
    assert main(["eval", str(resnet_dir), "--data", str(image_data), *common, str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["top1"] == b["top1"] and a["nll"] == b["nll"]


def test_bare_weights_file_uses_config_beside_it_or_warns(tmp_path, capsys, resnet_dir, image_data):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(resnet_dir / "model.safetensors", alone / "w.safetensors")
    assert (
        main(
            [
                "eval",
                str(alone / "w.safetensors"),
                "--arch",
                "test_resnet",
                "--data",
                str(image_data),
                *QUIET,
                "--subset",
                "4",
            ]
        )
        == 0
    )
    assert "records no preprocessing, so test_resnet's defaults are assumed: input 160x160" in " ".join(
        capsys.readouterr().err.split()
    )
    assert (
        main(
            [
                "eval",
                str(resnet_dir / "model.safetensors"),
                "--arch",
                "test_resnet",
                "--data",
                str(image_data),
                *QUIET,
                "--subset",
                "4",
                "--results-file",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    assert "records no preprocessing" not in capsys.readouterr().err
    assert json.loads((tmp_path / "r.json").read_text())["img_size"] == 32  # the checkpoint's own config.json


def _run(code: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=Path(__file__).resolve().parents[1],
    )


def test_version_and_help_import_neither_torch_nor_timm():
    r = _run(
        "import sys; from posthoc.cli import main; main(['--version']); main(['--help']); main(['boost', '--help']);"
        "print('heavy' if {'torch', 'timm'} & set(sys.modules) else 'light')"
    )
    assert r.returncode == 0 and r.stdout.strip().endswith("light"), r.stdout + r.stderr


def test_unreachable_hub_fails_fast_without_retry_lines():
    import time

    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9
    start = time.perf_counter()
    r = _run("import sys; from posthoc.cli import main; sys.exit(main(['info', 'hf-hub:nobody/nothing']))", env)
    assert time.perf_counter() - start < 30
    assert r.returncode == 2 and "Retrying" not in r.stderr
    assert "did not answer within" in r.stderr or "not in the local Hugging Face cache" in r.stderr, r.stderr


def test_info_of_a_good_artifact_still_works(world, capsys):
    assert main(["info", str(world / "art")]) == 0
    assert "members" in capsys.readouterr().out


# ------------------------------------------------------------------------------ inputs that look bad
def _eval_row(argv: list[str], tmp_path: Path, name: str = "r.json") -> dict:
    results = tmp_path / name
    assert main([*argv, *QUIET, "--results-file", str(results)]) == 0
    return json.loads(results.read_text())


def test_hidden_entries_are_neither_classes_nor_images(tmp_path, capsys, resnet_dir, image_data):
    data = tmp_path / "data"
    shutil.copytree(image_data, data)
    (data / "val" / ".ipynb_checkpoints").mkdir()  # an empty hidden folder among the classes
    (data / "val" / CLASSES[0] / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (data / "val" / CLASSES[0] / "._0000.png").write_bytes(b"\0\5\26\7 AppleDouble")  # a macOS fork, not an image
    (data / "val" / CLASSES[1] / ".cache").mkdir()
    (data / "val" / CLASSES[1] / ".cache" / "0000.png").write_bytes((data / "val" / CLASSES[1] / "0000.png").read_bytes())
    row = _eval_row(["eval", str(resnet_dir), "--data", str(data)], tmp_path)
    assert row["images"] == 60
    assert row == {
        **_eval_row(["eval", str(resnet_dir), "--data", str(image_data)], tmp_path, "plain.json"),
        "throughput": row["throughput"],
    }


def test_upper_case_tar_is_a_tar(tmp_path, resnet_dir, image_data):
    archive = tmp_path / "VAL.TAR"
    (tmp_path / "fork").write_bytes(b"\0\5\26\7 AppleDouble")
    with tarfile.open(archive, "w") as tf:
        for c in CLASSES:
            tf.add(image_data / "val" / c, c)
        tf.add(tmp_path / "fork", f"{CLASSES[0]}/._0000.png")  # hidden entries, as macOS tars hold them
        tf.add(image_data / "val" / CLASSES[0] / "0000.png", ".ipynb_checkpoints/0000.png")
    row = _eval_row(["eval", str(resnet_dir), "--data", str(archive)], tmp_path)
    plain = _eval_row(["eval", str(resnet_dir), "--data", str(image_data)], tmp_path, "plain.json")
    assert (row["images"], row["top1"], row["nll"]) == (plain["images"], plain["top1"], plain["nll"])


def test_a_linked_directory_is_followed_once(tmp_path, resnet_dir, image_data):
    data = tmp_path / "data"
    shutil.copytree(image_data, data)
    (data / "val" / CLASSES[0] / "loop").symlink_to(data / "val" / CLASSES[0], target_is_directory=True)
    (data / "val" / CLASSES[1] / "up").symlink_to(data / "val", target_is_directory=True)
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(image_data / "val" / CLASSES[2] / "0000.png", extra / "x.png")
    (data / "val" / CLASSES[2] / "more").symlink_to(extra, target_is_directory=True)
    from posthoc.data import open_split

    dataset = open_split(data, "val")
    # circle: its 20 (the loop into itself not followed); square: its 20, and through 'up' circle's 20 and
    # stripes' 20 and 1 (square itself reached already); stripes: its 20 and the linked folder's 1
    assert [dataset.targets.count(c) for c in range(3)] == [20, 20 + 20 + 21, 21]
    assert _eval_row(["eval", str(resnet_dir), "--data", str(data)], tmp_path)["images"] == 102


def test_high_depth_images_are_scaled_not_clipped(tmp_path, resnet_dir, image_data):
    from posthoc.data import decode_image

    grey = np.full((8, 8), 32768, dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")  # PIL keeps 16 bits
    rgb = np.asarray(decode_image(path.read_bytes()))
    assert rgb.shape == (8, 8, 3) and abs(int(rgb[0, 0, 0]) - 128) <= 1  # 32768 of 65535, not clipped to 255
    data = tmp_path / "data"
    shutil.copytree(image_data, data)
    for c in CLASSES:
        for png in (data / "val" / c).glob("*.png"):
            Image.fromarray(np.asarray(Image.open(png).convert("L")).astype(np.uint16) * 257).save(png)
    assert _eval_row(["eval", str(resnet_dir), "--data", str(data)], tmp_path)["images"] == 60


def test_a_decompression_bomb_is_an_unreadable_image(tmp_path, capsys, world, resnet_dir):
    row = _eval_row(["eval", str(resnet_dir), "--data", str(world / "bomb"), "--skip-bad-images"], tmp_path)
    assert row["images"] == 59 and row["skipped_images"] == 1
    assert "decompression bomb" in capsys.readouterr().err


def test_a_failing_model_gets_its_row_while_the_others_run(tmp_path, capsys, world, resnet_dir, image_data):
    results = tmp_path / "r.csv"
    specs = [str(resnet_dir), str(world / "w_int"), str(world / "w_huge"), "resnet5O", str(world / "labeled")]
    argv = ["eval", *specs, "--data", str(image_data), *QUIET, "--results-file", str(results)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "3 of 5 models failed (their rows hold the error)" in err and "Traceback" not in err
    import csv

    rows = list(csv.DictReader(results.open()))
    assert [r["model"] for r in rows] == specs
    assert [bool(r["error"]) for r in rows] == [False, True, True, True, False]
    assert "non-finite outputs" in rows[2]["error"] and "nan" not in (rows[0]["nll"] + rows[4]["nll"]).lower()
    assert main(argv) == 1  # its own results file is rewritten by the next run


def test_names_with_control_characters_print_escaped(tmp_path, capsys, resnet_dir):
    odd = tmp_path / "odd\x1b[2Jname\nx"
    shutil.copytree(resnet_dir, odd)
    out = tmp_path / "art"
    assert main(["ensemble", str(odd), str(resnet_dir), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "\x1b" not in shown and "odd\\x1b[2Jname\\nx" in shown.replace("\n", "")


def test_an_artifact_without_the_integrity_record_still_loads(tmp_path, world):
    old = tmp_path / "old"
    shutil.copytree(world / "art", old)
    config = json.loads((old / "config.json").read_text())
    del config["integrity"]
    config["command"] = "edited by hand, as artifacts of 0.2 could be"
    (old / "config.json").write_text(json.dumps(config))
    assert posthoc.load(old).num_members == 2
    flipped = tmp_path / "flipped"
    shutil.copytree(old, flipped)
    data = bytearray((flipped / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (flipped / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(posthoc.PosthocError, match="does not match the SHA-256"):
        posthoc.load(flipped)  # its weights are still checked


# ------------------------------------------------------------------------------ tuned-on images by content
@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, resnet_dir, image_data):
    """A one-member artifact calibrated on the select part of the generated data's val split."""
    out = tmp_path_factory.mktemp("cal") / "art"
    assert main(["calibrate", str(resnet_dir), "--data", str(image_data), "--out", str(out), "--workers", "0"]) == 0
    return out


def _warnings(capsys) -> str:
    return " ".join(capsys.readouterr().err.split())


def test_artifact_records_the_images_it_was_tuned_on(calibrated, image_data):
    from posthoc.data import content_digests, open_split

    record = json.loads((calibrated / "config.json").read_text())["data"]["tuned_images"]
    select = set(content_digests(open_split(image_data, "val:select")))
    assert record["count"] == len(select) == 24 and set(record["digests"].split()) == select


def test_eval_warns_on_tuned_images_by_content(tmp_path, capsys, calibrated, image_data):
    row = _eval_row(["eval", str(calibrated), "--data", str(image_data), "--split", "val:select"], tmp_path)
    assert row["tuned_images"] == 24 and "24 of the 24 images evaluated are among the 24" in _warnings(capsys)
    row = _eval_row(["eval", str(calibrated), "--data", str(image_data), "--split", "val:report"], tmp_path)
    assert row["tuned_images"] == 0 and "tuned on" not in _warnings(capsys)
    # the split gained files: the select part's positions moved, and some tuned images are in the report part now
    grown = tmp_path / "grown"
    shutil.copytree(image_data, grown)
    for i in range(12):
        shutil.copy(image_data / "train" / CLASSES[i % 3] / f"{i:04d}.png", grown / "val" / CLASSES[i % 3] / f"a{i:04d}.png")
    row = _eval_row(["eval", str(calibrated), "--data", str(grown), "--split", "val:report"], tmp_path)
    assert row["tuned_images"] > 0 and f"{row['tuned_images']} of the {row['images']} images evaluated" in _warnings(capsys)
    # the same images copied into another split, under other names
    moved = tmp_path / "moved"
    for c in CLASSES:
        (moved / "test" / c).mkdir(parents=True)
    from posthoc.data import open_split

    for i, (path, target) in enumerate(open_split(image_data, "val").samples):
        shutil.copy(path, moved / "test" / CLASSES[target] / f"img{i:03d}.png")
    row = _eval_row(["eval", str(calibrated), "--data", str(moved), "--split", "test"], tmp_path)
    assert row["tuned_images"] == 24


def test_training_on_the_val_split_marks_every_image_of_it(tmp_path, capsys, resnet_dir, image_data):
    out = tmp_path / "noisy"
    argv = ["boost", str(resnet_dir), "--method", "noisy", "--data", str(image_data), "--out", str(out), *QUIET]
    assert (
        main([*argv, "--train-split", "val", "--population", "4", "--members", "2", "--kl-samples", "5", "--bn-batches", "1"])
        == 0
    )
    assert json.loads((out / "config.json").read_text())["data"]["tuned_images"]["count"] == 60
    capsys.readouterr()
    row = _eval_row(["eval", str(out), "--data", str(image_data), "--split", "val:report"], tmp_path)
    assert row["tuned_images"] == 36 and "36 of the 36 images evaluated" in _warnings(capsys)
