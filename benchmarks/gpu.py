"""The exported-file rows of ``benchmarks/inference.py`` on a GPU, ready to run where there is one.

    python benchmarks/gpu.py --parent ../shared/parents/resnet18_cifar10_s0 --out benchmarks/results

For the parent, a head-only ensemble of 8 and a full ensemble of 4 (``benchmarks/inference.py``'s
``ONNX_ROWS``), at batch 1, 32 and 256, in the same interleaved rounds: the eager parent and
``posthoc.load`` on CUDA (members batched with ``vmap``, the default there), and the file ``posthoc
export`` writes, run by ONNX Runtime with the CUDA execution provider and with TensorRT's (inputs and
outputs kept on the GPU with I/O binding), plus the stacked graph under CUDA. Ratios are to the eager
parent of the same run. ONNX Runtime's GPU providers come with ``onnxruntime-gpu`` (TensorRT's also needs
TensorRT); the rows of a provider that is not there are left out, and the script says which.

Without a CUDA GPU it says so and exits 0 having written nothing. Writes ``inference_gpu.json`` and
``inference_gpu.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inference import ROOT, onnx_records, onnx_table

GPU_PROVIDERS = {
    "CUDA": ["CUDAExecutionProvider"],
    "TensorRT": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
}


def available_providers() -> tuple[dict[str, list[str]], list[str]]:
    """The GPU provider sets ONNX Runtime offers here, and a note for each one it does not."""
    try:
        import onnxruntime
    except ImportError:
        return {}, ["onnxruntime is not installed (pip install onnxruntime-gpu)"]
    have = set(onnxruntime.get_available_providers())
    found = {label: p for label, p in GPU_PROVIDERS.items() if p[0] in have}
    missing = [
        f"{label}: onnxruntime {onnxruntime.__version__} has no {p[0]} (onnxruntime-gpu{' and TensorRT' if label == 'TensorRT' else ''})"
        for label, p in GPU_PROVIDERS.items()
        if label not in found
    ]
    return found, missing


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parent", default=str(ROOT.parent / "shared" / "parents" / "resnet18_cifar10_s0"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=0.3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU on this machine: nothing measured; run benchmarks/gpu.py where there is one")
        return 0
    import timm

    device = torch.device(args.device)
    providers, missing = available_providers()
    for note in missing:
        print(f"left out: {note}")
    with tempfile.TemporaryDirectory() as tmp:
        records = onnx_records(
            args.parent,
            Path(tmp),
            device,
            providers,
            [int(b) for b in args.batches.split(",")],
            args.rounds,
            args.min_seconds,
            lambda: torch.cuda.synchronize(device),
            stacked=bool(providers),
        )
    meta = {
        "parent": args.parent,
        "device": torch.cuda.get_device_name(device),
        "host": platform.machine(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "rounds": args.rounds,
        "providers": providers,
        "left_out": missing,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "inference_gpu.json").write_text(json.dumps({"meta": meta, "onnx_records": records}, indent=1) + "\n")
    lines = [f"# Inference speed of exported files on {meta['device']} (torch {meta['torch']})\n"]
    lines += [f"Left out: {note}." for note in missing]
    lines += onnx_table(records, "cuda")
    (args.out / "inference_gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
