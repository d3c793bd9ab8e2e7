"""``posthoc demo``: the whole product on real data, offline, on a laptop CPU.

It writes scikit-learn's ``load_digits`` (1,797 real 8x8 handwritten digits, shipped inside the
package, so nothing is downloaded) as an ImageFolder, trains a small timm CNN on it for a few seconds,
boosts it with a method, and evaluates parent and ensemble on held-out digits that neither training nor
the method ever saw. Everything goes through the same public functions as the real commands.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import PosthocError

DIGITS_CFG = dict(
    input_size=(3, 32, 32),
    test_input_size=(3, 32, 32),
    crop_pct=1.0,
    test_crop_pct=1.0,
    interpolation="bilinear",
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
)


def write_digits(root: Path, val_fraction: float = 0.4, seed: int = 0) -> Path:
    """``root/{train,val}/<digit>/<i>.png`` from scikit-learn's digits (8x8 grey, 0..16 scaled to 0..255)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise PosthocError("the demo needs scikit-learn for its embedded digits; pip install 'posthoc[demo]'") from e
    from PIL import Image

    digits = load_digits()
    order = list(range(len(digits.target)))
    random.Random(seed).shuffle(order)
    n_val = int(len(order) * val_fraction)
    for rank, i in enumerate(order):
        split = "val" if rank < n_val else "train"
        folder = root / split / str(int(digits.target[i]))
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255.0 / 16.0)).clip(0, 255).astype("uint8")
        Image.fromarray(pixels, mode="L").save(folder / f"{i:04d}.png")
    return root


def train_parent(data: Path, out: Path, epochs: int = 20, seed: int = 0, show_progress: bool = False) -> Path:
    """Train timm's ``test_resnet`` from scratch on the digits (SGD, one-cycle) and save it in timm's Hub layout."""
    import timm
    from timm.models import save_for_hf

    from ..data import make_loader, open_split, resolve_data_config, train_transform
    from ..training import cycle, sgd_with_schedule, train_steps

    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", pretrained=False, num_classes=10, pretrained_cfg_overlay=dict(DIGITS_CFG))
    cfg = resolve_data_config(model)
    ds = open_split(data, "train", train_transform(cfg, "light"))
    loader = make_loader(ds, 64, shuffle=True, seed=seed, workers=0, drop_last=True)
    steps = epochs * len(loader)
    opt, sched = sgd_with_schedule(
        list(model.parameters()), steps, max_lr=0.1, weight_decay=5e-4, pct_start=0.25, div_factor=25.0
    )
    model.train()
    train_steps(
        model,
        cycle(loader, steps),
        opt,
        steps=steps,
        scheduler=sched,
        show_progress=show_progress,
        description="training the parent",
    )
    model.eval()
    save_for_hf(model, str(out), safe_serialization=True)
    return out


DEMO_METHOD = "resample"  # chosen on the digits' select part: benchmarks/results/demo_sweep_6ep.md
DEMO_PARENT_EPOCHS = 6


def run_demo(
    method: str = DEMO_METHOD,
    out: Path = Path("runs/demo"),
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
    progress: bool = True,
    parent_epochs: int = DEMO_PARENT_EPOCHS,
    seed: int = 0,
    **config: Any,
) -> dict[str, Any]:
    """Write the digits, train a parent briefly (``parent_epochs``, seeded), boost it with ``method``, and
    evaluate both on held-out digits that neither training nor the method saw.

    The default method and parent were chosen on the digits' select part (``benchmarks/demo_sweep.py``,
    table ``benchmarks/results/demo_sweep_6ep.md``): a parent trained for a few seconds, and ``resample``'s
    mean model, one network at the parent's inference cost."""
    from ..data import eval_transform, make_loader, open_split, resolve_data_config
    from ..evaluate import evaluate
    from ..methods import get_method
    from ..sources import load_artifact, load_model
    from .boost import boost

    get_method(method)  # an unknown name fails before any work
    out = Path(out)
    data, parent_dir = out / "digits", out / f"parent-{parent_epochs}ep-s{seed}"
    artifact = out / f"{parent_dir.name}-{method}"
    start = time.perf_counter()
    if not (data / "val").is_dir():
        write_digits(data)
    if not (parent_dir / "model.safetensors").is_file():
        log(f"training a small timm CNN (test_resnet) on 1,079 digits for {parent_epochs} epochs ...")
        train_parent(data, parent_dir, epochs=parent_epochs, seed=seed, show_progress=progress)
    log(f"boosting it with '{method}' ...")
    summary = boost(
        [str(parent_dir)],
        method,
        data,
        artifact,
        overwrite=True,
        workers=0,
        progress=progress,
        log=log,
        warn=warn,
        command=f"posthoc demo --method {method} --seed {seed}",
        seed=seed,
        **config,
    )
    parent = load_model(str(parent_dir))
    report = open_split(data, "val:report", eval_transform(resolve_data_config(parent)))
    loader = make_loader(report, 256, workers=0)
    results = {
        "parent": evaluate(parent, loader, show_progress=False),
        method: evaluate(load_artifact(artifact), loader, show_progress=False),
        "images": len(report),
        "artifact": str(artifact),
        "build_seconds": summary["seconds"],
        "seconds": time.perf_counter() - start,
    }
    return results
