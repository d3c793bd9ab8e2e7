"""The ``posthoc`` command line: a thin layer over the library.

Every command that takes a model takes the same spec (see :mod:`posthoc.sources`), and every user
error ends in one line on stderr and exit status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import PosthocError

app = typer.Typer(
    name="posthoc",
    help="Post-training ensembles for timm and Hugging Face Hub image classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)

# ------------------------------------------------------------------------------- shared options
ModelArg = Annotated[str, typer.Argument(help="timm name[.tag], hf-hub:org/name, local-dir:PATH, a directory, a posthoc artifact, or a weights file.")]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="timm architecture of a bare weights file.")]
NumClassesOpt = Annotated[Optional[int], typer.Option("--num-classes", help="Re-head the model to N classes.")]
DataOpt = Annotated[Path, typer.Option("--data", help="Dataset directory: DATA/<split>/<class>/<image>.")]
SplitOpt = Annotated[str, typer.Option("--split", help="Split folder, optionally with a part: val, val:select, val:report.")]
SelectSizeOpt = Annotated[Optional[int], typer.Option("--select-size", help="Images in a split's select part (default 40%).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Images per batch.")]
WorkersOpt = Annotated[Optional[int], typer.Option("--workers", "-j", help="DataLoader workers (default: spare cores).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Inference dtype: float32, float16 or bfloat16.")]
AmpOpt = Annotated[bool, typer.Option("--amp", help="Mixed precision (float16 on CUDA, bfloat16 on CPU).")]
SubsetOpt = Annotated[Optional[int], typer.Option("--subset", help="Use a fixed random sample of N images.")]
ImgSizeOpt = Annotated[Optional[int], typer.Option("--img-size", help="Override the input size.")]
CropPctOpt = Annotated[Optional[float], typer.Option("--crop-pct", help="Override the center-crop fraction.")]
InterpOpt = Annotated[Optional[str], typer.Option("--interpolation", help="Override the resize interpolation.")]
MeanOpt = Annotated[Optional[str], typer.Option("--mean", help="Override normalization mean, e.g. 0.5,0.5,0.5.")]
StdOpt = Annotated[Optional[str], typer.Option("--std", help="Override normalization std, e.g. 0.5,0.5,0.5.")]
ProgressOpt = Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.")]


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise PosthocError(f"--{name} must be comma-separated numbers like 0.5,0.5,0.5, got '{text}'") from None


def preprocessing_overrides(img_size, crop_pct, interpolation, mean, std) -> dict[str, Any]:
    """CLI preprocessing flags as timm ``resolve_data_config`` arguments."""
    return {
        "img_size": img_size,
        "crop_pct": crop_pct,
        "interpolation": interpolation,
        "mean": _floats(mean, "mean"),
        "std": _floats(std, "std"),
    }


def _version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"posthoc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = False,
):
    """Post-training ensembles for timm and Hugging Face Hub image classifiers."""


# ---------------------------------------------------------------------------------------- eval
@app.command("eval")
def eval_command(
    model: ModelArg,
    data: DataOpt,
    split: SplitOpt = "val",
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    batch_size: BatchOpt = 256,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    amp: AmpOpt = False,
    subset: SubsetOpt = None,
    select_size: SelectSizeOpt = None,
    results_file: Annotated[Optional[Path], typer.Option("--results-file", help="Write results to .json or .csv.")] = None,
    img_size: ImgSizeOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    show_progress: ProgressOpt = True,
):
    """Evaluate a model or ensemble artifact: top-1/top-5 (as timm's validate.py), NLL, ECE, Brier, throughput."""
    from . import data as data_mod
    from .evaluate import evaluate, write_results
    from .runtime import resolve_device, resolve_dtype
    from .sources import load_model

    dev, dt = resolve_device(device), resolve_dtype(dtype)
    if results_file and results_file.suffix.lower() not in (".json", ".csv"):
        raise PosthocError(f"--results-file must end in .json or .csv, got '{results_file.name}'")
    spec = data_mod.SplitSpec.parse(split)
    net = load_model(model, arch=arch, num_classes=num_classes)
    data_config = data_mod.resolve_data_config(net, preprocessing_overrides(img_size, crop_pct, interpolation, mean, std))
    dataset = data_mod.image_folder(
        data,
        spec,
        data_mod.eval_transform(data_config),
        label_names=net.pretrained_cfg.get("label_names"),
        select_size=select_size,
        subset=subset,
    )
    _warn_if_tuned_on(net, data, spec)
    loader = data_mod.make_loader(dataset, batch_size, workers=workers)
    result = evaluate(net, loader, device=dev, dtype=dt, amp=amp, data_config=data_config, show_progress=show_progress)
    result["model"] = model
    result["split"] = str(spec)
    if results_file:
        write_results(result, results_file)
    _print_result(result)


def _warn_if_tuned_on(net, data: Path, spec) -> None:
    """Ensembles record the data they tuned on; say so when evaluating on an overlapping part."""
    tuned = getattr(net, "posthoc_config", {}).get("data", {}).get("tuned_on")
    if not tuned:
        return
    t_split, _, t_part = tuned.partition(":")
    if t_split == spec.split and (spec.part is None or spec.part == t_part or not t_part):
        err_console.print(
            f"[yellow]warning:[/] this artifact was tuned on '{tuned}'; figures on '{spec}' are optimistic. "
            f"Report on '{t_split}:report' instead."
        )


def _print_result(result: dict[str, Any]) -> None:
    table = Table(title=f"{result['model']} on {result.get('split', '')} ({result['images']} images)")
    table.add_column("metric")
    table.add_column("value", justify="right")
    rows = [
        ("top-1 (%)", "top1", "{:.2f}"),
        ("top-5 (%)", "top5", "{:.2f}"),
        ("NLL", "nll", "{:.4f}"),
        ("ECE (%)", "ece", "{:.2f}"),
        ("Brier", "brier", "{:.4f}"),
        ("members", "members", "{}"),
        ("mean member top-1 (%)", "member_top1", "{:.2f}"),
        ("disagreement (%)", "disagreement", "{:.2f}"),
        ("params (M)", "param_count", "{:.2f}"),
        ("throughput (img/s)", "throughput", "{:.0f}"),
    ]
    for label, key, fmt in rows:
        if result.get(key) is not None:
            table.add_row(label, fmt.format(result[key]))
    console.print(table)


# ----------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status; :class:`PosthocError` becomes one line and status 2."""
    try:
        app(args=argv, prog_name="posthoc")
    except SystemExit as e:  # typer/click exit normally, and on usage errors (status 2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except PosthocError as e:
        err_console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return PosthocError.exit_code
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        return 130
    return 0


def entrypoint() -> None:  # pragma: no cover - console script
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entrypoint()
