"""Bad inputs through the command line: one line naming the problem and the fix, exit status 2, no
traceback, nothing written outside ``--out``; and the faults around them (full disk, killed writes,
unreachable Hub, unreadable images, file modes, dtypes, start-up imports)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import posthoc
from posthoc.cli import main

from .helpers import CLASSES, QUIET, save_hub_layout, tiny_model


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
    return w


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
]


def _snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for r in roots for p in r.rglob("*") if p.is_file()}


@pytest.mark.parametrize("args, message", CASES, ids=[" ".join(a[:4]) + f" #{i}" for i, (a, _) in enumerate(CASES)])
def test_bad_input_gets_one_line(tmp_path, capsys, monkeypatch, world, resnet_dir, image_data, args, message):
    import re

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    argv = [a.format(m=resnet_dir, d=image_data, w=world, o=out) for a in args] + (
        ["--no-progress"] if args[0] in ("eval", "boost") else []
    )
    before = _snapshot(world, resnet_dir, image_data, tmp_path)
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    error_lines = [line for line in lines if line.startswith("error:")]
    assert code == 2, err
    assert len(error_lines) == 1 and "Traceback" not in err, err
    text = " ".join(error_lines[0].split())
    assert re.search(message, text), text
    assert _snapshot(world, resnet_dir, image_data, tmp_path) == before  # nothing written, nothing removed
    assert not out.exists()


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40


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
