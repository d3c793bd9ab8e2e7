"""Inference speed of fused artifacts, side by side with the parent and a naive loop over members.

    python benchmarks/inference.py --parent ../shared/parents/resnet18_cifar10_s0 --out benchmarks/results

For K in {1, 4, 8} and batch in {1, 32, 256}, in one process on the same machine, it times:
``single`` (the parent alone), ``loop`` (K plain timm models called one after the other, what a user
would write) and ``fused`` (``posthoc.load`` of the artifact, default strategy), plus ``fused-vmap``
(the batched strategy forced), ``fused-loop`` (members one after another, to show what running them
side by side on CPU threads gives) and ``fused-unfolded`` (BatchNorm not folded into the convolutions, to
show what folding gives). Two member families:

- ``head``: members differ only in the classifier (e.g. a SuperNet or a noisy ``--scope 0`` artifact);
- ``full``: every weight differs (a deep ensemble, a default noisy artifact).

Timings interleave the variants over several rounds and keep the median, because the machines are
shared and noisy. Speeds are reported as ratios; nothing here is a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def members(parent: torch.nn.Module, k: int, family: str) -> list[torch.nn.Module]:
    """K perturbed copies of ``parent``: only the classifier (``head``) or every weight (``full``)."""
    out = []
    for i in range(k):
        m = copy.deepcopy(parent)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            params = m.get_classifier().parameters() if family == "head" else m.parameters()
            for p in params:
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
        out.append(m.eval())
    return out


def time_variants(variants: dict, x: torch.Tensor, rounds: int, min_seconds: float, sync) -> dict[str, float]:
    """Median seconds per call of each variant, interleaved over ``rounds`` rounds."""
    samples: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn(x)
        for _ in range(rounds):
            for name, fn in variants.items():
                n, start = 0, time.perf_counter()
                while True:
                    fn(x)
                    n += 1
                    sync()
                    elapsed = time.perf_counter() - start
                    if elapsed >= min_seconds:
                        break
                samples[name].append(elapsed / n)
    return {k: statistics.median(v) for k, v in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parent", default=str(ROOT.parent / "shared" / "parents" / "resnet18_cifar10_s0"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ks", default="1,4,8")
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=0.3)
    args = ap.parse_args()

    import timm

    import posthoc
    from posthoc import Ensemble, load_model

    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    parent = load_model(args.parent).to(device).eval()
    size = tuple(parent.pretrained_cfg["input_size"])
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("head", "full"):
            for k in map(int, args.ks.split(",")):
                nets = members(load_model(args.parent), k, family)
                path = Path(tmp) / f"{family}{k}"
                posthoc.save(Ensemble.from_models(nets), path)
                fused = posthoc.load(path).to(device)
                fused_vmap = posthoc.load(path, strategy="vmap").to(device)
                fused_loop = posthoc.load(path, strategy="loop").to(device)
                fused_unfolded = posthoc.load(path, fold_bn=False).to(device)
                nets = [n.to(device) for n in nets]
                mb = sum(f.stat().st_size for f in path.iterdir()) / 1e6
                for batch in map(int, args.batches.split(",")):
                    x = torch.randn(batch, *size, device=device, generator=None)
                    t = time_variants(
                        {
                            "single": parent,
                            "loop": lambda x, nets=nets: [n(x).softmax(-1) for n in nets],
                            "fused": fused,
                            "fused-vmap": fused_vmap,
                            "fused-loop": fused_loop,
                            "fused-unfolded": fused_unfolded,
                        },
                        x,
                        args.rounds,
                        args.min_seconds,
                        sync,
                    )
                    rec = {
                        "family": family,
                        "members": k,
                        "batch": batch,
                        "device": device.type,
                        "images_per_second": {n: batch / s for n, s in t.items()},
                        "fused_time_over_single": t["fused"] / t["single"],
                        "fused_speedup_over_loop": t["loop"] / t["fused"],
                        "vmap_speedup_over_loop": t["loop"] / t["fused-vmap"],
                        "bn_folding_speedup": t["fused-unfolded"] / t["fused"],
                        "fused_loop_speedup_over_loop": t["loop"] / t["fused-loop"],
                        "artifact_mb": round(mb, 1),
                    }
                    records.append(rec)
                    print(
                        f"{family:4s} K={k} batch={batch:3d}: single {batch / t['single']:8.0f}  loop {batch / t['loop']:8.0f}  "
                        f"fused {batch / t['fused']:8.0f}  fused-loop {batch / t['fused-loop']:8.0f}  vmap {batch / t['fused-vmap']:8.0f} img/s | fused/single time "
                        f"{rec['fused_time_over_single']:.2f}  fused vs loop x{rec['fused_speedup_over_loop']:.2f}  "
                        f"BN folding x{rec['bn_folding_speedup']:.2f}",
                        flush=True,
                    )
    meta = {
        "parent": args.parent,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "rounds": args.rounds,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    (args.out / f"inference{suffix}.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1) + "\n")
    lines = [
        f"# Inference speed ({device.type}; {meta['machine']}; torch {meta['torch']})\n",
        "images/s, median of interleaved rounds. `loop`: K plain models one after another; `fused`: `posthoc.load` "
        "(shared prefix once, BatchNorm folded into convolutions; member-specific part on CPU threads side by side when "
        "members differ beyond the classifier, else looped; vmap on CUDA); `fused-loop`, `fused-vmap`: those strategies "
        "forced; `unfolded`: fused without BatchNorm folding.\n",
        "| members differ in | K | batch | single | loop | fused | fused-loop | fused-vmap | unfolded | fused time / single | fused / loop speed | folding speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        ips = r["images_per_second"]
        lines.append(
            f"| {'classifier only' if r['family'] == 'head' else 'every weight'} | {r['members']} | {r['batch']} | "
            f"{ips['single']:.0f} | {ips['loop']:.0f} | {ips['fused']:.0f} | {ips['fused-loop']:.0f} | {ips['fused-vmap']:.0f} | "
            f"{ips['fused-unfolded']:.0f} | {r['fused_time_over_single']:.2f} | {r['fused_speedup_over_loop']:.2f} | "
            f"{r['bn_folding_speedup']:.2f} |"
        )
    (args.out / f"inference{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
