"""The sweeps' scoring half: methods tune on the first 1,000 images of ``val:select`` and are scored on the
other 1,000, so a sweep chooses defaults without reading the report part (benchmarks/PROTOCOL.md)."""

from __future__ import annotations

from pathlib import Path


def inner_holdout(data: Path, transform, first: int = 1000):
    """The part of ``val:select`` after its first ``first`` images (same shuffled order as the split): with
    CIFAR-10's 2,000-image select part and the default, its second half."""
    from torch.utils.data import Subset

    from posthoc.data import open_split

    full = open_split(data, "val:select", transform)
    first = set(open_split(data, "val:select", transform, select_size=first).indices)
    keep = [i for i in full.indices if i not in first]
    view = Subset(full.dataset, keep)
    view.classes = full.dataset.classes
    return view


def scoring_half(parent_spec: str, data: Path, first: int = 1000, batch_size: int = 250, workers: int | None = None):
    """The parent, a loader over the scoring half with its eval transform, and the parent's scores there."""
    from posthoc import load_model
    from posthoc.data import eval_transform, make_loader, resolve_data_config
    from posthoc.evaluate import evaluate

    parent = load_model(parent_spec)
    loader = make_loader(inner_holdout(data, eval_transform(resolve_data_config(parent)), first), batch_size, workers=workers)
    return parent, loader, evaluate(parent, loader, show_progress=False)


def tuning_half(parent, data: Path, first: int = 1000, batch_size: int = 250):
    """A loader over the first ``first`` images of ``val:select``, where every sweep's method tunes."""
    from posthoc.data import eval_transform, make_loader, open_split, resolve_data_config

    return make_loader(open_split(data, "val:select", eval_transform(resolve_data_config(parent)), select_size=first), batch_size)


def run_config(method: str, parent_spec: str, data: Path, config: dict, seed: int, scoring, tuning) -> dict:
    """``boost --method METHOD`` tuning on the first 1,000 select images, scored on the scoring half as built (views
    chosen by ``--tta auto``) and with the image alone (the same members, boost's last step with ``--tta none``)."""
    import tempfile
    import time

    import torch

    import posthoc
    from posthoc.artifact import read
    from posthoc.calibration import finish
    from posthoc.commands.boost import boost
    from posthoc.evaluate import evaluate, headline
    from posthoc.fused import EnsembleModule

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = boost(
            [parent_spec],
            method,
            data,
            Path(tmp) / "a",
            select_size=1000,
            overwrite=True,
            progress=False,
            log=lambda m: None,
            seed=seed,
            **config,
        )
        seconds = time.perf_counter() - start
        built = evaluate(posthoc.load(Path(tmp) / "a"), scoring, show_progress=False)
        ensemble, _ = read(Path(tmp) / "a")
        plain, _ = finish(ensemble, tuning, torch.device("cpu"), tta="none")
        alone = evaluate(EnsembleModule(plain.as_float32()), scoring, show_progress=False)
    notes = summary["notes"]
    return {
        "seconds": round(seconds, 1),
        "views": notes["views"]["chosen"]["views"],
        "flops_ratio": summary["cost"]["flops_ratio"],
        "auto": headline(built),
        "none": headline(alone),
        "temperature": (notes.get("temperature") or {}).get("temperature"),
        "notes": {k: v for k, v in notes.items() if k in ("children", "sigma", "budget_parent_epochs", "child_disagreement")},
    }
