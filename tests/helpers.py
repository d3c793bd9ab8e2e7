"""Helpers for tests: tiny real timm models, generated ImageFolder data, a filled Hub cache."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image

SMALL_CFG = dict(
    input_size=(3, 32, 32),
    test_input_size=(3, 32, 32),
    crop_pct=1.0,
    test_crop_pct=1.0,
    mean=(0.5, 0.5, 0.5),
    std=(0.25, 0.25, 0.25),
    interpolation="bilinear",
)
CLASSES = ("circle", "square", "stripes")


def tiny_model(name: str = "test_resnet", num_classes: int = 3, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A randomly initialised tiny timm model for 32x32 inputs (seeded)."""
    torch.manual_seed(seed)
    if name.startswith("test_vit"):
        kwargs.setdefault("img_size", 32)
    return timm.create_model(
        name, pretrained=False, num_classes=num_classes, pretrained_cfg_overlay=dict(SMALL_CFG), **kwargs
    ).eval()


def save_hub_layout(model: torch.nn.Module, directory: Path) -> Path:
    """Save ``model`` as timm's Hub layout (config.json + model.safetensors)."""
    from timm.models import save_for_hf

    save_for_hf(model, str(directory), safe_serialization=True)
    return directory


def _draw(kind: int, rng: np.random.Generator, size: int = 32) -> Image.Image:
    """A class-dependent pattern with random colour, position and noise, so classes are learnable."""
    img = rng.normal(110, 30, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(10, size - 10, 2)
    color = rng.uniform(150, 255, 3)
    if kind == 0:
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < rng.integers(25, 64)
    elif kind == 1:
        r = rng.integers(4, 8)
        mask = (abs(yy - cy) < r) & (abs(xx - cx) < r)
    else:
        mask = ((xx + rng.integers(0, 4)) // 3) % 2 == 0
    img[mask] = color
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_image_folder(root: Path, per_class: dict[str, int], seed: int = 0, ext: str = "png") -> Path:
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for c, name in enumerate(CLASSES):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _draw(c, rng).save(d / f"{i:04d}.{ext}")
    return root


def fill_hf_cache(repo_id: str, files: dict[str, bytes], revision: str = "main") -> Path:
    """Put ``files`` into the local Hugging Face cache as if ``repo_id`` had been downloaded."""
    commit = "0" * 40
    repo_dir = Path(os.environ["HF_HUB_CACHE"]) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    return snapshot


def assert_same_artifact(a: Path, b: Path) -> None:
    """Two artifacts built with the same seed: identical weights, card and config, except the forward time
    ratio measured on the machine (the only field that is a wall-clock measurement)."""
    import json

    for name in ("model.safetensors", "README.md"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    configs = [json.loads((d / "config.json").read_text()) for d in (a, b)]
    for config in configs:
        config["method"]["measured"].get("inference_cost", {}).pop("time_ratio", None)
        config.pop("integrity", None)  # the SHA-256 of the rest, time_ratio included
    assert configs[0] == configs[1]


# ------------------------------------------------------------------------------------ running posthoc
QUIET = ["--workers", "0", "--no-progress"]  # CLI flags of every test run: no loader workers, no progress bars

TINY = {  # each method's options for runs of seconds on the generated data (Python keywords)
    "noisy": dict(population=8, members=5, kl_samples=20),
    "resample": dict(batch_size=16, members=2, include_mean=False, bn_batches=1),  # 120 images: 7 steps an epoch
    "sparse": dict(batch_size=16, child_epochs=0.5, bn_batches=1, include_parent=False),
    "lastlayer": dict(epochs_per_layer=2, batch_size=16),
    "supernet": dict(epochs_per_layer=2, batch_size=16, coupling_epochs=2),
}


def run_boost(parents, method: str, data: Path, out: Path, *, tiny: bool = True, **options):
    """``posthoc.commands.boost.boost`` quietly (no workers, progress or log) with ``TINY[method]`` as defaults."""
    from posthoc.commands.boost import boost

    specs = [str(p) for p in parents] if isinstance(parents, (list, tuple)) else [str(parents)]
    chosen = {**(TINY[method] if tiny else {}), **options}
    return boost(specs, method, data, out, workers=0, progress=False, log=lambda m: None, **chosen)


def flags(**options) -> list[str]:
    """Python keywords as command-line flags: ``child_epochs=0.5`` -> ``--child-epochs 0.5``, booleans as switches."""
    out: list[str] = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        out += ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, str(value)]
    return out


def boost_args(parents, method: str, data: Path, out: Path, *extra: str, tiny: bool = False) -> list[str]:
    """``posthoc boost`` arguments for the CLI, quiet, optionally with ``TINY[method]``."""
    specs = [str(p) for p in parents] if isinstance(parents, (list, tuple)) else [str(parents)]
    preset = flags(**TINY[method]) if tiny else []
    return ["boost", *specs, "--method", method, "--data", str(data), "--out", str(out), *QUIET, *preset, *extra]
