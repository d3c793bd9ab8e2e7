"""The ``posthoc`` command line: parses arguments, calls the library, prints.

Every command that takes a model takes the same spec (see :mod:`posthoc.sources`), and every user
error ends in one line on stderr and exit status 2. A method's options are flags of ``boost`` and
``demo`` generated from its declared config fields, so ``posthoc boost --method NAME --help`` lists
them with their defaults and choices.
"""

from __future__ import annotations

import functools
import inspect
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperCommand

from . import distributed
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
ModelArg = Annotated[
    str,
    typer.Argument(help="timm name[.tag], hf-hub:org/name, local-dir:PATH, a directory, a posthoc artifact, or a weights file."),
]
ArchOpt = Annotated[Optional[str], typer.Option("--arch", help="timm architecture of a bare weights file.")]
NumClassesOpt = Annotated[Optional[int], typer.Option("--num-classes", help="Re-head the model to N classes.")]
DataOpt = Annotated[str, typer.Option("--data", help="DATA/<split>/<class>/<image>, a .tar of one split, or hfds/NAME.")]
SplitOpt = Annotated[str, typer.Option("--split", help="Split folder, optionally with a part: val, val:select, val:report.")]
SelectSizeOpt = Annotated[
    Optional[int],
    typer.Option("--select-size", help="Number of images in a split's select part (default: 40% of the split's images)."),
]
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
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing artifact at --out.")]
ClassMapOpt = Annotated[
    Optional[Path],
    typer.Option("--class-map", help="The data's class names in the model's class order, one per line (timm's format)."),
]
SkipBadOpt = Annotated[
    bool, typer.Option("--skip-bad-images", help="Skip unreadable images (each named, counted at the end) instead of stopping.")
]


def on_rank_zero(command: Callable[..., Any]) -> Callable[..., Any]:
    """A command that does not split its work: under torchrun rank 0 runs it while the others wait."""

    @functools.wraps(command)
    def run_on_rank_zero(*args: Any, **kwargs: Any) -> Any:
        return distributed.on_main(lambda: command(*args, **kwargs))

    return run_on_rank_zero


def _log(message: str) -> None:
    """Progress messages from the library, printed verbatim (paths may contain [brackets])."""
    console.print(escape(message), highlight=False)


def _warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


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


def _command_line() -> str:
    return "posthoc " + " ".join(shlex.quote(a) for a in sys.argv[1:])


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


# ---------------------------------------------------------------------------- method options
class MethodOptionsCommand(TyperCommand):
    """A command whose flags include the options of the method named by ``--method`` (``-m``).

    The method is read from the arguments before parsing, and its config fields become typer options
    (``posthoc boost --method noisy --help`` lists them); their values reach the command in
    ``ctx.meta["method_options"]``, only those given on the command line.
    """

    default_method: str | None = None

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        base = [p for p in self.params if not getattr(p, "method_option", False)]
        name = _peek_method(args) or self.default_method
        self.params = base + (_method_params(name) if name else [])
        return super().parse_args(ctx, args)

    def invoke(self, ctx) -> Any:
        names = [p.name for p in self.params if getattr(p, "method_option", False)]
        given = {n: ctx.params.pop(n) for n in names if n in ctx.params}
        ctx.meta["method_options"] = {n: v for n, v in given.items() if v is not None}
        return super().invoke(ctx)


class DemoCommand(MethodOptionsCommand):
    default_method = "resample"


def _peek_method(args: list[str]) -> str | None:
    for i, arg in enumerate(args):
        if arg in ("--method", "-m") and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--method="):
            return arg.split("=", 1)[1]
    return None


def _method_params(name: str) -> list:
    """Typer options for every config field of method ``name`` (hidden ones for renamed fields), built by
    typer itself from a generated signature, so they parse, convert and show help like any other."""
    from .methods import get_method
    from .methods.base import describe_options, flag

    config_cls = get_method(name).Config
    options = describe_options(config_cls)
    by_name = {o["name"]: o for o in options}
    panel = f"Options of method '{name}'"
    specs = [(o["name"], o["flag"], o, _option_help(o), False) for o in options]
    specs += [
        (old, flag(old), by_name[r.new], f"Deprecated: use {by_name[r.new]['flag']}.", True)
        for old, r in config_cls.renamed.items()
    ]
    parameters, annotations = [], {}
    for field_name, field_flag, opt, help_text, hidden in specs:
        kind = opt["type"]
        if opt["choices"]:
            kind = Literal[tuple(opt["choices"])]
        decl = f"{field_flag}/--no-{field_flag[2:]}" if kind is bool else field_flag
        annotation = Annotated[
            Optional[kind], typer.Option(decl, help=help_text, hidden=hidden, show_default=False, rich_help_panel=panel)
        ]
        parameters.append(inspect.Parameter(field_name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation))
        annotations[field_name] = annotation

    def options(**values):  # pragma: no cover - only its signature is used
        return values

    options.__signature__ = inspect.Signature(parameters)
    options.__annotations__ = annotations
    holder = typer.Typer(add_completion=False)
    holder.command()(options)
    params = typer.main.get_command(holder).params
    for p in params:
        p.method_option = True
    return params


def _option_help(opt: dict[str, Any]) -> str:
    bounds = [
        f"{word} {opt[k]:g}" for k, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")) if opt.get(k) is not None
    ]
    default = (
        {False: "off", True: "on"}.get(opt["default"], opt["default"]) if isinstance(opt["default"], bool) else opt["default"]
    )
    notes = ([f"default: {default}"] if default is not None else []) + bounds
    return escape(opt["help"] + (f" [{'; '.join(notes)}]" if notes else ""))


# ---------------------------------------------------------------------------------------- eval
@app.command("eval")
def eval_command(
    data: DataOpt,
    models: Annotated[
        Optional[list[str]],
        typer.Argument(
            help="Model specs (timm names with wildcards like 'resnet5*.a1_in1k', hf-hub:, directories, artifacts, weights files)."
        ),
    ] = None,
    split: SplitOpt = "val",
    model_list: Annotated[
        Optional[Path], typer.Option("--model-list", help="A file of model specs, one per line, # comments.")
    ] = None,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    batch_size: BatchOpt = 256,
    workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "float32",
    amp: AmpOpt = False,
    channels_last: Annotated[
        Optional[bool],
        typer.Option("--channels-last/--no-channels-last", help="Channels-last inputs and weights (default: on CUDA)."),
    ] = None,
    compile: Annotated[bool, typer.Option("--compile", help="torch.compile the model before evaluating.")] = False,
    subset: SubsetOpt = None,
    select_size: SelectSizeOpt = None,
    results_file: Annotated[
        Optional[Path], typer.Option("--results-file", help="Write a row per model to .json or .csv, as each finishes.")
    ] = None,
    sort: Annotated[Optional[str], typer.Option("--sort", help="Sort the rows by this field, descending (e.g. top1).")] = None,
    valid_labels: Annotated[
        Optional[Path],
        typer.Option("--valid-labels", help="The model's class indices the data's classes are, one per line (ImageNet-A/R)."),
    ] = None,
    real_labels: Annotated[
        Optional[Path],
        typer.Option("--real-labels", help="ImageNet-ReaL real.json: top-1/top-5 count any label of an image's set."),
    ] = None,
    img_size: ImgSizeOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    class_map: ClassMapOpt = None,
    skip_bad_images: SkipBadOpt = False,
    show_progress: ProgressOpt = True,
):
    """Evaluate models or ensemble artifacts: top-1/top-5 (as timm's validate.py), NLL, ECE, Brier, throughput."""
    from .evaluate import check_eval_options, check_results_file, evaluate_specs, speed_paths
    from .sources import expand_specs

    preprocessing = preprocessing_overrides(img_size, crop_pct, interpolation, mean, std)
    options = dict(
        arch=arch,
        num_classes=num_classes,
        batch_size=batch_size,
        workers=workers,
        device=device,
        dtype=dtype,
        amp=amp,
        channels_last=channels_last,
        compile=compile,
        subset=subset,
        select_size=select_size,
        preprocessing=preprocessing,
        class_map=class_map,
        valid_labels=valid_labels,
        real_labels=real_labels,
        skip_bad_images=skip_bad_images,
        show_progress=show_progress,
        warn=_warn,
    )
    check_results_file(results_file)  # before any work
    check_eval_options(**options)
    specs = expand_specs(list(models or []), model_list)
    _log(speed_paths(device, amp=amp, channels_last=channels_last, compile=compile))
    if len(specs) == 1:  # one model: its problems are argument problems (exit 2), its table detailed
        from .evaluate import evaluate_spec, write_results

        result = evaluate_spec(specs[0], data, split, **options)
        _print_result(result)  # before the results file, so a failed write never loses the numbers
        if result.get("skipped_images"):
            _warn(f"skipped {result['skipped_images']} unreadable image(s); the metrics cover the other {result['images']}")
        if results_file:
            write_results(result, results_file)
        return
    rows = evaluate_specs(specs, data, split, results_file=results_file, sort=sort, on_result=_print_row, **options)
    _print_rows(rows)
    failed = [r for r in rows if "error" in r]
    if failed:
        _warn(f"{len(failed)} of {len(rows)} models failed (their rows hold the error)")
        raise typer.Exit(1)


def _print_row(row: dict[str, Any]) -> None:
    if "error" in row:
        err_console.print(f"[red]{escape(row['model'])}: {escape(row['error'])}[/]", highlight=False, soft_wrap=True)
    else:
        console.print(
            f"{escape(row['model'])}: top-1 {row['top1']:.2f}%, NLL {row['nll']:.4f} ({row['images']} images)", highlight=False
        )


def _print_rows(rows: list[dict[str, Any]]) -> None:
    table = Table(title=f"{len(rows)} models on {rows[0].get('split', '')}")
    for column in ("model", "top-1 (%)", "top-5 (%)", "NLL", "ECE (%)", "params (M)", "img/s"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for r in rows:
        if "error" in r:
            table.add_row(escape(r["model"]), "[red]failed[/]", "", "", "", "", "")
        else:
            table.add_row(
                escape(r["model"]),
                f"{r['top1']:.2f}",
                f"{r['top5']:.2f}",
                f"{r['nll']:.4f}",
                f"{r['ece']:.2f}",
                f"{r['param_count']:.2f}",
                f"{r['throughput']:.0f}",
            )
    console.print(table)


def _print_result(result: dict[str, Any]) -> None:
    table = Table(title=escape(f"{result['model']} on {result.get('split', '')} ({result['images']} images)"))
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


# --------------------------------------------------------------------------------------- boost
@app.command("boost", cls=MethodOptionsCommand)
def boost_command(
    ctx: typer.Context,
    models: Annotated[list[str], typer.Argument(help="The parent model (several for methods that merge checkpoints).")],
    method: Annotated[str, typer.Option("--method", "-m", help="Method name; its options appear with --method NAME --help.")],
    data: DataOpt,
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="Artifact directory (default runs/<model>-<method>).")
    ] = None,
    train_split: Annotated[str, typer.Option("--train-split", help="Split a method may train on.")] = "train",
    val_split: Annotated[str, typer.Option("--val-split", help="Split whose select part a method tunes and selects on.")] = "val",
    select_size: SelectSizeOpt = None,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    overwrite: OverwriteOpt = False,
    temperature_scaling: Annotated[
        bool,
        typer.Option(
            "--temperature-scaling/--no-temperature-scaling",
            help="Fit one temperature on the select part as the last step (stored in the artifact).",
        ),
    ] = True,
    distill: Annotated[
        bool,
        typer.Option(
            "--distill",
            help="Distil the artifact into one network as the last step (written to --out; the ensemble to OUT-teacher).",
        ),
    ] = False,
    distill_epochs: Annotated[float, typer.Option("--distill-epochs", help="Epochs of distillation with --distill.")] = 1.0,
    subset: Annotated[
        Optional[int],
        typer.Option("--subset", help="Quick look: a fixed random sample of N training (and at most N select) images."),
    ] = None,
    class_map: ClassMapOpt = None,
    skip_bad_images: SkipBadOpt = False,
    dtype: Annotated[
        str,
        typer.Option("--dtype", help="Dtype of the stored weights: auto (the parent checkpoint's), float32, float16, bfloat16."),
    ] = "auto",
    amp: Annotated[
        bool, typer.Option("--amp", help="Mixed precision in training loops (float16 + grad scaler on CUDA, bfloat16 on CPU).")
    ] = False,
    inference_budget: Annotated[
        Optional[float],
        typer.Option(
            "--inference-budget",
            help="Most forward FLOPs per image the artifact may cost, in parent forward passes (e.g. 1.5); the method "
            "chooses its members and their shared part to fit. Options given explicitly override it.",
        ),
    ] = None,
    img_size: ImgSizeOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    show_progress: ProgressOpt = True,
):
    """Build an ensemble artifact from a checkpoint with a post-training method.

    The method's own options (e.g. `--members 9 --target-kl 0.05` for noisy) are listed by
    `posthoc boost --method NAME --help`.
    """
    from .boost import boost
    from .distill import DistillConfig

    _refuse_values_of_switches(models, ctx)
    summary = boost(
        models,
        method,
        data,
        out,
        arch=arch,
        num_classes=num_classes,
        train_split=train_split,
        val_split=val_split,
        select_size=select_size,
        device=device,
        workers=workers,
        overwrite=overwrite,
        temperature_scaling=temperature_scaling,
        inference_budget=inference_budget,
        distill=DistillConfig(epochs=distill_epochs) if distill else None,
        subset=subset,
        class_map=class_map,
        skip_bad_images=skip_bad_images,
        dtype=dtype,
        amp=amp,
        show_progress=show_progress,
        preprocessing=preprocessing_overrides(img_size, crop_pct, interpolation, mean, std),
        log=_log,
        warn=_warn,
        command=_command_line(),
        **ctx.meta["method_options"],
    )
    ens, par, cost = summary["ensemble"], summary["parent"], summary["cost"]
    table = Table(title=f"validation (select part): parent vs {summary['members']}-member ensemble")
    table.add_column("metric")
    table.add_column("parent", justify="right")
    table.add_column("ensemble", justify="right")
    table.add_column("change", justify="right")
    for label, key, fmt in (
        ("top-1 (%)", "top1", "{:.2f}"),
        ("NLL", "nll", "{:.4f}"),
        ("ECE (%)", "ece", "{:.2f}"),
        ("Brier", "brier", "{:.4f}"),
    ):
        table.add_row(label, fmt.format(par[key]), fmt.format(ens[key]), ("{:+" + fmt[2:]).format(ens[key] - par[key]))
    table.add_row("members", "1", str(cost["members"]), "")
    table.add_row("parameters (M)", "", f"{cost['parameters'] / 1e6:.2f}", "")
    table.add_row("forward FLOPs (x parent)", "1.00", f"{cost['flops_ratio']:.2f}", "")
    table.add_row("forward time (x parent, this machine)", "1.00", f"{cost['time_ratio']:.2f}", "")
    console.print(table)
    final = summary["student"]["out"] if summary["student"] else summary["out"]
    if summary["student"]:
        _print_student(summary["student"])
    console.print(
        f"wrote {escape(final)} in {summary['seconds']:.0f} s; report on held-out data with "
        f"`posthoc eval {escape(final)} --data DATA --split val:report`",
        highlight=False,
    )


def _print_student(r: dict[str, Any]) -> None:
    table = Table(title="distilled student on the select part (1 network)")
    for column in ("metric", "parent", "teacher", "student"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for label, key, fmt in (("top-1 (%)", "top1", "{:.2f}"), ("NLL", "nll", "{:.4f}"), ("ECE (%)", "ece", "{:.2f}")):
        table.add_row(label, fmt.format(r["before"][key]), fmt.format(r["teacher"][key]), fmt.format(r["student"][key]))
    table.add_row("forward FLOPs (x parent)", "1.00", f"{r['teacher_flops_ratio']:.2f}", "1.00")
    console.print(table)
    console.print(f"distillation cost: about {r['cost_parent_epochs']:.2f} parent-epochs (from FLOPs)", highlight=False)


SWITCH_VALUES = {"true", "false", "yes", "no", "on", "off", "0", "1"}


def _refuse_values_of_switches(models: list[str], ctx) -> None:
    """``--include-parent false`` hands 'false' to the models list: say what on/off options look like."""
    for spec in models[1:]:
        if spec.lower() in SWITCH_VALUES and not Path(spec).exists():
            raise PosthocError(
                f"'{spec}' looks like a value for an on/off option, which takes none: write --NAME to switch it on and "
                "--no-NAME to switch it off (e.g. --no-include-parent)"
            )


# ----------------------------------------------------------------------------------- calibrate
@app.command("calibrate")
@on_rank_zero
def calibrate_command(
    model: ModelArg,
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact directory to write.")],
    val_split: Annotated[str, typer.Option("--val-split", help="Split whose select part the temperature is fitted on.")] = "val",
    select_size: SelectSizeOpt = None,
    arch: ArchOpt = None,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    overwrite: OverwriteOpt = False,
    img_size: ImgSizeOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    class_map: ClassMapOpt = None,
    skip_bad_images: SkipBadOpt = False,
):
    """Fit a temperature on the select part: a checkpoint becomes a calibrated one-member artifact; an artifact is re-calibrated."""
    from .calibrate import calibrate

    r = calibrate(
        model,
        data,
        out,
        val_split=val_split,
        select_size=select_size,
        arch=arch,
        device=device,
        workers=workers,
        overwrite=overwrite,
        preprocessing=preprocessing_overrides(img_size, crop_pct, interpolation, mean, std),
        class_map=class_map,
        skip_bad_images=skip_bad_images,
        command=_command_line(),
        log=_log,
    )
    console.print(
        f"wrote {escape(r['out'])}; report on held-out data with `posthoc eval {escape(r['out'])} --data DATA --split val:report`",
        highlight=False,
    )


# ------------------------------------------------------------------------------------- distill
@app.command("distill")
@on_rank_zero
def distill_command(
    teacher: Annotated[str, typer.Argument(help="An ensemble artifact (directory or hf-hub:org/name).")],
    data: DataOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact directory for the student.")],
    student: Annotated[Optional[str], typer.Option("--student", help="Model to train (default: the artifact's parent).")] = None,
    epochs: Annotated[float, typer.Option("--epochs", help="Epochs over the training split (fractions allowed).")] = 1.0,
    temperature: Annotated[float, typer.Option("--temperature", help="Softening temperature of teacher and student.")] = 4.0,
    alpha: Annotated[
        Optional[float], typer.Option("--alpha", help="Weight of the distillation term (default 0.9; 1.0 with --consensus).")
    ] = None,
    consensus: Annotated[
        bool, typer.Option("--consensus", help="Collaborative loss: cross-entropy + alpha x symmetric CE to the ensemble.")
    ] = False,
    cache_teacher: Annotated[
        bool, typer.Option("--cache-teacher", help="One teacher pass over a fixed augmented view of every image.")
    ] = False,
    mixup: Annotated[
        float,
        typer.Option("--mixup", help="Beta(A, A) mixup of each batch, the teacher scoring the mixed images (0: off)."),
    ] = 0.0,
    schedule: Annotated[str, typer.Option("--schedule", help="onecycle, cosine or constant.")] = "onecycle",
    max_lr: Annotated[float, typer.Option("--max-lr", help="Peak SGD learning rate.")] = 0.02,
    batch_size: BatchOpt = 128,
    seed: Annotated[int, typer.Option("--seed", help="Random seed; the same seed gives the same student.")] = 0,
    train_split: Annotated[str, typer.Option("--train-split", help="Split the student trains on.")] = "train",
    val_split: Annotated[str, typer.Option("--val-split", help="Split whose select part scores the student.")] = "val",
    temperature_scaling: Annotated[
        bool, typer.Option("--temperature-scaling/--no-temperature-scaling", help="Calibrate the student on the select part.")
    ] = True,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    overwrite: OverwriteOpt = False,
    class_map: ClassMapOpt = None,
    skip_bad_images: SkipBadOpt = False,
    show_progress: ProgressOpt = True,
):
    """Distil an ensemble artifact into one network (1x inference): knowledge distillation or the consensus loss."""
    from .distill import DistillConfig, distill

    cfg = DistillConfig(
        epochs=epochs,
        temperature=temperature,
        alpha=alpha,
        consensus=consensus,
        cache_teacher=cache_teacher,
        mixup=mixup,
        schedule=schedule,
        max_lr=max_lr,
        batch_size=batch_size,
        seed=seed,
    )
    r = distill(
        teacher,
        data,
        out,
        student=student,
        config=cfg,
        train_split=train_split,
        val_split=val_split,
        temperature_scaling=temperature_scaling,
        device=device,
        workers=workers,
        overwrite=overwrite,
        class_map=class_map,
        skip_bad_images=skip_bad_images,
        show_progress=show_progress,
        log=_log,
        command=_command_line(),
    )
    _print_student(r)
    console.print(
        f"wrote {escape(r['out'])}; report on held-out data with `posthoc eval {escape(r['out'])} --data DATA --split val:report`",
        highlight=False,
    )


# ---------------------------------------------------------------------------------------- demo
@app.command("demo", cls=DemoCommand)
@on_rank_zero
def demo_command(
    ctx: typer.Context,
    method: Annotated[
        str, typer.Option("--method", "-m", help="Method to demonstrate; its options appear with --method NAME --help.")
    ] = "resample",
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the digits, the parent and the artifact go.")] = Path(
        "runs/demo"
    ),
    parent_epochs: Annotated[int, typer.Option("--parent-epochs", help="Epochs to train the demo parent.")] = 6,
    show_progress: ProgressOpt = True,
):
    """Offline demo on real data shipped with scikit-learn: train a small parent, boost it, compare."""
    from .demo import run_demo

    r = run_demo(
        method, out, log=_log, warn=_warn, show_progress=show_progress, parent_epochs=parent_epochs, **ctx.meta["method_options"]
    )
    table = Table(title=f"held-out digits ({r['images']} images, never used for training or tuning)")
    table.add_column("metric")
    table.add_column("parent", justify="right")
    table.add_column(method, justify="right")
    for label, key, fmt in (
        ("top-1 (%)", "top1", "{:.2f}"),
        ("NLL", "nll", "{:.4f}"),
        ("ECE (%)", "ece", "{:.2f}"),
        ("Brier", "brier", "{:.4f}"),
    ):
        table.add_row(label, fmt.format(r["parent"][key]), fmt.format(r[method][key]))
    table.add_row("members", "1", str(r[method].get("members", 1)))
    console.print(table)
    console.print(
        f"artifact: {escape(r['artifact'])} (built in {r['build_seconds']:.0f} s; whole demo {r['seconds']:.0f} s). "
        f"Next: posthoc info {escape(r['artifact'])}",
        highlight=False,
    )


# ------------------------------------------------------------------------------------- methods
@app.command("methods")
def methods_command(name: Annotated[Optional[str], typer.Argument(help="Show one method's options.")] = None):
    """List the ensembling methods, or one method's options with their defaults."""
    from .methods import get_method, list_methods
    from .methods.base import describe_options

    for n in [name] if name else list_methods():
        cls = get_method(n)
        console.print(f"[bold]{n}[/]: {escape(cls.summary)}")
        if name:
            table = Table(show_header=True, box=None)
            table.add_column("option")
            table.add_column("default", justify="right")
            table.add_column("meaning")
            for opt in describe_options(cls.Config):
                table.add_row(opt["flag"], escape(str(opt["default"])), escape(opt["help"]))
            console.print(table)


# ------------------------------------------------------------------------------------ ensemble
@app.command("ensemble")
@on_rank_zero
def ensemble_command(
    models: Annotated[list[str], typer.Argument(help="Two or more model specs of one label space.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact directory to write.")],
    combine: Annotated[str, typer.Option("--combine", help="prob_mean, logit_mean or vote.")] = "prob_mean",
    arch: ArchOpt = None,
    overwrite: OverwriteOpt = False,
    dtype: Annotated[
        str, typer.Option("--dtype", help="Dtype of the stored weights: auto (the checkpoints'), float32, float16, bfloat16.")
    ] = "auto",
):
    """Build a deep-ensemble artifact from several checkpoints (members may differ in architecture)."""
    from .boost import ensemble_checkpoints

    ens = ensemble_checkpoints(models, out, combine=combine, arch=arch, overwrite=overwrite, dtype=dtype, command=_command_line())
    console.print(
        f"wrote {escape(str(out))} ({ens.num_members} members, {len(ens.groups)} architecture group(s))", highlight=False
    )


# ---------------------------------------------------------------------------------------- info
@app.command("info")
@on_rank_zero
def info_command(artifact: Annotated[str, typer.Argument(help="An artifact directory or hf-hub:org/name.")]):
    """Show an artifact's members, method, what is shared, sizes and stored metrics."""
    from .artifact import read, summarize
    from .sources import artifact_dir

    path = artifact_dir(artifact)
    _, config = read(path)  # checks the weights against the recorded size and SHA-256
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("artifact", escape(artifact))
    for label, text in summarize(config, path):
        table.add_row(label, escape(text))
    console.print(table)


# ---------------------------------------------------------------------------------------- push
@app.command("push")
@on_rank_zero
def push_command(
    artifact: Annotated[Path, typer.Argument(help="An artifact directory.")],
    repo: Annotated[str, typer.Option("--repo", help="Hub model repository, org/name (created if absent).")],
    private: Annotated[Optional[bool], typer.Option("--private/--public", help="Visibility of a new repository.")] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to commit to (created if absent).")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")] = False,
    message: Annotated[Optional[str], typer.Option("--message", "-m", help="Commit message.")] = None,
    token: Annotated[
        Optional[str], typer.Option("--token", help="Hub token (default: hf auth login / HF_TOKEN).", show_default=False)
    ] = None,
):
    """Upload an artifact to the Hugging Face Hub with its model card; load it back as hf-hub:org/name."""
    from .artifact import push
    from .hub import hub_spec, split_repo

    url = push(artifact, repo, private=private, revision=revision, create_pr=create_pr, commit_message=message, token=token)
    spec = escape(hub_spec(split_repo(repo)[0], None if create_pr else revision))
    if create_pr:
        console.print(
            f'opened pull request {escape(url)}; once it is merged, load it with posthoc.load("{spec}")', highlight=False
        )
        return
    console.print(f"pushed {escape(str(artifact))} to {escape(url)}", highlight=False)
    console.print(f'load it with posthoc.load("{spec}") or `posthoc eval {spec} --data DATA`', highlight=False)


# ----------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status; user errors become one line and status 2.

    Launched by torchrun (``WORLD_SIZE > 1``), every process runs the command (:mod:`posthoc.distributed`):
    ``eval`` and ``boost`` split their work, the other commands run on rank 0; only rank 0 prints, and a
    failure on any process ends all of them after rank 0 printed its one line.
    """
    return distributed.run(lambda: _run(argv), report=_print_error)


def _print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _run(argv: list[str] | None) -> int:
    console.quiet = err_console.quiet = not distributed.is_main()  # rank 0 prints for all processes
    command = typer.main.get_command(app)
    try:
        result = command.main(args=argv, prog_name="posthoc", standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("[yellow]interrupted[/]")
        return 130
    except PosthocError:
        raise
    except Exception as e:  # usage errors of the command-line parser (typer's own click)
        if not (hasattr(e, "format_message") and hasattr(e, "exit_code")):
            raise
        if type(e).__name__ == "NoArgsIsHelpError":
            console.print(e.format_message(), highlight=False, markup=False)
            return 0
        ctx = getattr(e, "ctx", None)
        hint = f" (see posthoc {ctx.info_name} --help)" if ctx is not None and ctx.parent is not None else " (see posthoc --help)"
        err_console.print(f"[bold red]error:[/] {escape(e.format_message())}{hint}", highlight=False, soft_wrap=True)
        return e.exit_code
    return result if isinstance(result, int) else 0


def entrypoint() -> None:  # pragma: no cover - console script
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entrypoint()
