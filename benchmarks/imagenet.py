"""ImageNet benchmark: every method on every model, the CIFAR-10 table's columns, GPU inference ratios.

    # real ImageNet (an ImageFolder with train/ and val/, a .tar of val plus train/, or hfds/imagenet-1k) on a GPU:
    python benchmarks/imagenet.py --data /data/imagenet --device cuda --out benchmarks/results --name imagenet
    # a quick look: 100 training images per class-equivalent and a 5,000-image select part
    python benchmarks/imagenet.py --data /data/imagenet --device cuda --train-subset 100000 --select-size 5000
    # the smoke run committed in benchmarks/results/imagenet_smoke.md (generated data, tiny models, CPU):
    python benchmarks/imagenet.py --smoke --out benchmarks/results --name imagenet_smoke

For each model (default ``resnet50.a1_in1k``, ``vit_small_patch16_224.augreg_in21k_ft_in1k``,
``convnext_tiny.fb_in1k``) it evaluates the parent on ``val:report``, boosts it with every method at
its defaults (plus ``--method-flags`` for quick looks), evaluates each artifact on ``val:report``, and
records top-1, NLL, ECE, Brier, members, parameters, size, wall time, cost in parent-epochs (one parent
training epoch over the training split is extrapolated from ``--epoch-steps`` timed steps, since a
real epoch takes hours), the FLOPs ratio and the forward-time ratio at batch 32 and 256 on the device.
Methods tune on ``val:select`` only (benchmarks/PROTOCOL.md's rule, with ImageNet's 50,000 images cut 40/60 unless
``--select-size`` says otherwise).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["resnet50.a1_in1k", "vit_small_patch16_224.augreg_in21k_ft_in1k", "convnext_tiny.fb_in1k"]
METHODS = ["noisy", "resample", "lastlayer", "supernet", "sparse"]
QUICK = {  # settings for the smoke run and --quick: tiny budgets that still exercise every code path
    "noisy": {"population": 4, "members": 3, "kl_samples": 50, "bn_batches": 1},
    "resample": {"epochs": 0.5, "bn_batches": 1, "batch_size": 16},
    "lastlayer": {"epochs_per_layer": 1, "batch_size": 16},
    "supernet": {"epochs_per_layer": 1, "coupling_epochs": 1, "batch_size": 16},
    "sparse": {"members": 2, "child_epochs": 0.25, "bn_batches": 1, "batch_size": 16},
}


def smoke_setup(root: Path, names: list[str]) -> tuple[Path, list[str]]:
    """A generated ImageNet-shaped folder (10 classes x 20 images at 224 px per split) and three tiny
    timm models of 10 classes saved in timm's Hub layout (random weights: the run checks plumbing)."""
    import numpy as np
    import timm
    from PIL import Image
    from timm.models import save_for_hf

    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("val", 20)):
        for c in range(10):
            folder = root / "data" / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                base = np.full((224, 224, 3), 25 * c, dtype=np.uint8)
                noise = rng.integers(0, 60, (224, 224, 3), dtype=np.uint8)
                Image.fromarray(base + noise).save(folder / f"{split}_{c}_{i:03d}.JPEG", format="JPEG")
    specs = []
    for name in names:
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, num_classes=10)
        save_for_hf(model, str(root / name), safe_serialization=True)
        specs.append(str(root / name))
    return root / "data", specs


def parent_epoch_seconds(spec: str, data: str, device: torch.device, steps: int, batch: int, workers: int | None) -> float:
    """One parent training epoch over the training split, extrapolated from ``steps`` timed SGD steps."""
    from posthoc import load_model
    from posthoc.data import make_loader, open_split, resolve_data_config, train_transform
    from posthoc.training import cycle, train_steps

    model = load_model(spec).to(device).train()
    dataset = open_split(data, "train", train_transform(resolve_data_config(model), "timm"))
    loader = make_loader(dataset, batch, shuffle=True, drop_last=True, workers=workers)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    steps = min(steps, len(loader))
    train_steps(model, cycle(loader, 1), opt, device=device)  # warm-up
    start = time.perf_counter()
    train_steps(model, cycle(loader, steps), opt, device=device)
    return (time.perf_counter() - start) / steps * len(loader)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", help="ImageFolder root (train/ and val/), or hfds/imagenet-1k")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="auto")
    ap.add_argument("--train-subset", type=int, default=None, help="boost on a fixed random sample of N training images")
    ap.add_argument("--select-size", type=int, default=None)
    ap.add_argument("--quick", action="store_true", help="tiny method budgets (as the smoke run)")
    ap.add_argument("--epoch-steps", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: spare cores)")
    ap.add_argument("--time-rounds", type=int, default=3, help="alternating rounds of the forward-time ratio")
    ap.add_argument("--time-batches", default="32,256", help="two batch sizes of the forward-time ratio")
    ap.add_argument("--smoke", action="store_true", help="generated data and tiny models, CPU")
    ap.add_argument("--smoke-models", default="test_resnet,test_efficientnet,test_vit")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="imagenet")
    args = ap.parse_args()

    import timm

    from posthoc import load
    from posthoc.commands.boost import boost
    from posthoc.commands.eval import evaluate_spec
    from posthoc.cost import time_ratio
    from posthoc.errors import PosthocError
    from posthoc.paths import size_mb
    from posthoc.runtime import resolve_device
    from posthoc.sources import load_model

    tmp = Path(tempfile.mkdtemp(prefix="posthoc-imagenet-"))
    try:
        if args.smoke:
            data, models = smoke_setup(tmp, args.smoke_models.split(","))
            args.quick, args.epoch_steps, args.batch_size, args.workers, args.time_rounds = True, 2, 16, 0, 1
        else:
            if not args.data:
                raise SystemExit("--data is required (or --smoke)")
            data, models = args.data, args.models.split(",")
        device = resolve_device(args.device)
        batches = [int(b) for b in args.time_batches.split(",")]
        records = []
        for spec in models:
            print(f"{spec}: parent ...", flush=True)
            epoch_s = parent_epoch_seconds(spec, str(data), device, args.epoch_steps, args.batch_size, args.workers)
            parent_result = evaluate_spec(
                spec,
                data,
                "val:report",
                select_size=args.select_size,
                device=args.device,
                workers=args.workers,
                progress=False,
            )
            parent = load_model(spec).to(device)
            records.append(_record(spec, "parent", None, parent_result, 0.0, epoch_s, 1.0, dict.fromkeys(batches, 1.0), None))
            for method in args.methods.split(","):
                out = tmp / "runs" / f"{Path(spec).name}-{method}"
                config = dict(QUICK[method]) if args.quick else {}
                print(f"  {method} ...", flush=True)
                start = time.perf_counter()
                try:
                    summary = boost(
                        [spec],
                        method,
                        data,
                        out,
                        select_size=args.select_size,
                        subset=args.train_subset,
                        device=args.device,
                        workers=args.workers,
                        overwrite=True,
                        progress=False,
                        log=lambda m: None,
                        **config,
                    )
                except PosthocError as e:  # a method this model cannot take: a row saying why
                    records.append({"model": spec, "method": method, "config": config, "error": str(e)})
                    print(f"    error: {e}", flush=True)
                    continue
                seconds = time.perf_counter() - start
                result = evaluate_spec(str(out), data, "val:report", device=args.device, workers=args.workers, progress=False)
                module = load(out).to(device)
                ratios = {b: round(time_ratio(module, parent, batch=b, rounds=args.time_rounds), 3) for b in batches}
                records.append(
                    _record(spec, method, config, result, seconds, epoch_s, summary["cost"]["flops_ratio"], ratios, size_mb(out))
                )
                m = records[-1]
                times = ", ".join(f"x{r:.2f} at batch {b}" for b, r in ratios.items())
                print(
                    f"    top-1 {m['top1']:.2f} NLL {m['nll']:.4f} cost {m['parent_epochs']:.2f} parent-epochs, time {times}",
                    flush=True,
                )
        meta = {
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
            "torch": torch.__version__,
            "timm": timm.__version__,
            "smoke": args.smoke,
            "quick": args.quick,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": records}, indent=1) + "\n")
        (args.out / f"{args.name}.md").write_text(_table(records, meta, args))
        print((args.out / f"{args.name}.md").read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _record(spec, method, config, result, seconds, epoch_s, flops, ratios, mb) -> dict:
    return {
        "model": spec,
        "method": method,
        "config": config,
        "top1": result["top1"],
        "nll": result["nll"],
        "ece": result["ece"],
        "brier": result["brier"],
        "members": result.get("members", 1),
        "params_m": result["param_count"],
        "artifact_mb": mb,
        "wall_seconds": round(seconds, 1),
        "parent_epoch_seconds": round(epoch_s, 2),
        "parent_epochs": round(seconds / epoch_s, 4) if epoch_s else None,
        "flops_ratio": round(flops, 3),
        "time_ratio": {str(b): r for b, r in ratios.items()},
        "images": result["images"],
    }


def _table(records: list[dict], meta: dict, args) -> str:
    batches = list(records[0]["time_ratio"]) if records else []
    width = 9 + len(batches)
    lines = [
        "| model | row | top-1 (%) | NLL | ECE (%) | Brier | members | params (M) | cost (s) | parent-epochs | FLOPs (x parent) | "
        + " | ".join(f"time b{b} (x parent)" for b in batches)
        + " |",
        "|---|---|" + "---:|" * (9 + len(batches)),
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {Path(r['model']).name} | {r['method']} | error: {r['error']} |" + " |" * (width - 1))
            continue
        times = " | ".join(f"{r['time_ratio'][b]:.2f}" for b in batches)
        lines.append(
            f"| {Path(r['model']).name} | {r['method']} | {r['top1']:.2f} | {r['nll']:.4f} | {r['ece']:.2f} | "
            f"{r['brier']:.4f} | {r['members']} | {r['params_m']:.2f} | {r['wall_seconds']:.0f} | "
            f"{r['parent_epochs']:.3f} | {r['flops_ratio']:.2f} | {times} |"
        )
    head = (
        "# ImageNet benchmark (smoke run: generated 224 px data, tiny random models, CPU)\n\n"
        "This run checks that the script works end to end; its numbers say nothing about the methods "
        "(random weights, 10 classes x 20 images). The command for real ImageNet on a GPU is\n\n"
        "    python benchmarks/imagenet.py --data /data/imagenet --device cuda --out benchmarks/results --name imagenet\n\n"
        if meta["smoke"]
        else "# ImageNet benchmark\n\n"
    )
    return (
        head
        + f"Metrics on `val:report`; methods tuned on `val:select`. Device {meta['device']}"
        + (f" ({meta['gpu']})" if meta["gpu"] else "")
        + f"; torch {meta['torch']}, timm {meta['timm']}"
        + ("; tiny method budgets (--quick)" if meta["quick"] else "; method defaults")
        + ".\n\n"
        + "\n".join(lines)
        + "\n"
    )


if __name__ == "__main__":
    main()
