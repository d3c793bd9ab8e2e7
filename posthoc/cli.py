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
from rich.markup import escape
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


def _log(message: str) -> None:
    """Progress messages from the library, printed verbatim (paths may contain [brackets])."""
    console.print(escape(message), highlight=False)


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
    select_size = _check_tuned_on(net, spec, select_size)
    data_config = data_mod.resolve_data_config(net, preprocessing_overrides(img_size, crop_pct, interpolation, mean, std))
    dataset = data_mod.image_folder(
        data,
        spec,
        data_mod.eval_transform(data_config),
        label_names=net.pretrained_cfg.get("label_names"),
        select_size=select_size,
        subset=subset,
    )
    loader = data_mod.make_loader(dataset, batch_size, workers=workers)
    result = evaluate(net, loader, device=dev, dtype=dt, amp=amp, data_config=data_config, show_progress=show_progress)
    result["model"] = model
    result["split"] = str(spec)
    if results_file:
        write_results(result, results_file)
    _print_result(result)


def _check_tuned_on(net, spec, select_size: int | None) -> int | None:
    """Artifacts record the split part and select size they tuned on: evaluate the parts with the same
    size by default, and warn when the evaluated images overlap the tuned ones."""
    data = getattr(net, "posthoc_config", {}).get("data", {})
    tuned = data.get("tuned_on")
    if not tuned:
        return select_size
    t_split, _, t_part = tuned.partition(":")
    if t_split != spec.split:
        return select_size
    recorded = data.get("select_size")
    if select_size is None:
        select_size = recorded
    overlap = spec.part is None or spec.part == t_part or not t_part
    if spec.part == "report" and recorded is not None and select_size < recorded:
        overlap = True
    if overlap:
        err_console.print(
            f"[yellow]warning:[/] this artifact was tuned on '{escape(tuned)}' ({recorded} images); figures on "
            f"'{escape(str(spec))}' with select size {select_size} are optimistic. Report on '{escape(t_split)}:report'."
        )
    return select_size


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


# --------------------------------------------------------------------------------------- boost
@app.command(
    "boost",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def boost_command(
    ctx: typer.Context,
    models: Annotated[list[str], typer.Argument(help="The parent model (several for methods that merge checkpoints).")],
    method: Annotated[str, typer.Option("--method", "-m", help="Method name; `posthoc methods` lists them and their options.")],
    data: DataOpt,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Artifact directory (default runs/<model>-<method>).")] = None,
    train_split: Annotated[str, typer.Option("--train-split", help="Split a method may train on.")] = "train",
    val_split: Annotated[str, typer.Option("--val-split", help="Split whose select part a method tunes and selects on.")] = "val",
    select_size: SelectSizeOpt = None,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    device: DeviceOpt = "auto",
    workers: WorkersOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
    img_size: ImgSizeOpt = None,
    crop_pct: CropPctOpt = None,
    interpolation: InterpOpt = None,
    mean: MeanOpt = None,
    std: StdOpt = None,
    show_progress: ProgressOpt = True,
):
    """Build an ensemble artifact from a checkpoint with a post-training method.

    Method hyper-parameters are extra flags, e.g. `--target-kl 0.02 --members 8`; run
    `posthoc methods NAME` to list them with their defaults.
    """
    from .boost import boost
    from .methods import get_method

    method_cls = get_method(method)
    # click hands unknown --flags (the method's options) and their values to the MODELS argument
    tokens = list(models) + list(ctx.args)
    first_flag = next((i for i, t in enumerate(tokens) if t.startswith("--")), len(tokens))
    models, method_args = tokens[:first_flag], tokens[first_flag:]
    if not models:
        raise PosthocError("give the model to boost first: posthoc boost MODEL --method NAME --data DIR")
    config = parse_method_flags(method_cls.Config, method_args)
    summary = boost(
        models, method, data, out, arch=arch, num_classes=num_classes, train_split=train_split, val_split=val_split,
        select_size=select_size, device=device, workers=workers, overwrite=overwrite, show_progress=show_progress,
        preprocessing=preprocessing_overrides(img_size, crop_pct, interpolation, mean, std),
        log=_log, command=_command_line(), **config,
    )
    _print_boost_summary(summary)


def parse_method_flags(config_cls, args: list[str]) -> dict[str, Any]:
    """Turn ``--some-name value`` / ``--flag`` / ``--no-flag`` into typed config values."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(config_cls)
    fields = {f.name: hints[f.name] for f in dataclasses.fields(config_cls)}
    values: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise PosthocError(f"unexpected argument '{arg}'; method options look like --name value")
        key, eq, inline = arg[2:].partition("=")
        name = key.replace("-", "_")
        negated = name.startswith("no_") and name[3:] in fields and _base_type(fields[name[3:]]) is bool
        if negated:
            values[name[3:]] = False
            i += 1
            continue
        if name not in fields:
            valid = ", ".join("--" + n.replace("_", "-") for n in fields)
            raise PosthocError(f"unknown option --{key} for this method; it takes {valid}")
        kind = _base_type(fields[name])
        if kind is bool and not eq:
            values[name] = True
            i += 1
            continue
        if not eq:
            if i + 1 >= len(args):
                raise PosthocError(f"option --{key} needs a value")
            inline, i = args[i + 1], i + 1
        values[name] = _convert(inline, kind, key)
        i += 1
    return values


def _base_type(tp):
    import types
    import typing

    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _convert(text: str, kind, key: str):
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if text.lower() == "none":
            return None
        return kind(text) if kind in (int, float, str) else text
    except ValueError:
        raise PosthocError(f"option --{key} expects {getattr(kind, '__name__', kind)}, got '{text}'") from None


def _print_boost_summary(summary: dict[str, Any]) -> None:
    ens, par = summary["ensemble"], summary["parent"]
    table = Table(title=f"validation (select part): parent vs {summary['members']}-member ensemble")
    table.add_column("metric")
    table.add_column("parent", justify="right")
    table.add_column("ensemble", justify="right")
    for label, key, fmt in (("top-1 (%)", "top1", "{:.2f}"), ("NLL", "nll", "{:.4f}"), ("ECE (%)", "ece", "{:.2f}"), ("Brier", "brier", "{:.4f}")):
        table.add_row(label, fmt.format(par[key]), fmt.format(ens[key]))
    console.print(table)
    console.print(f"wrote {summary['out']} in {summary['seconds']:.0f} s; report on held-out data with "
                  f"`posthoc eval {summary['out']} --data DATA --split val:report`", highlight=False)


@app.command("demo", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def demo_command(
    ctx: typer.Context,
    method: Annotated[str, typer.Option("--method", "-m", help="Method to demonstrate.")] = "noisy",
    out: Annotated[Path, typer.Option("--out", "-o", help="Where the digits, the parent and the artifact go.")] = Path("runs/demo"),
    parent_epochs: Annotated[int, typer.Option("--parent-epochs", help="Epochs to train the demo parent.")] = 20,
    show_progress: ProgressOpt = True,
):
    """Offline demo on real data shipped with scikit-learn: train a small parent, boost it, compare."""
    from .demo import run_demo
    from .methods import get_method

    config = parse_method_flags(get_method(method).Config, list(ctx.args))
    r = run_demo(method, out, log=_log, show_progress=show_progress,
                 parent_epochs=parent_epochs, **config)
    table = Table(title=f"held-out digits ({r['images']} images, never used for training or tuning)")
    table.add_column("metric")
    table.add_column("parent", justify="right")
    table.add_column(method, justify="right")
    for label, key, fmt in (("top-1 (%)", "top1", "{:.2f}"), ("NLL", "nll", "{:.4f}"), ("ECE (%)", "ece", "{:.2f}"),
                            ("Brier", "brier", "{:.4f}")):
        table.add_row(label, fmt.format(r["parent"][key]), fmt.format(r[method][key]))
    table.add_row("members", "1", str(r[method].get("members", 1)))
    console.print(table)
    console.print(f"artifact: {r['artifact']} (built in {r['build_seconds']:.0f} s; whole demo {r['seconds']:.0f} s). "
                  f"Next: posthoc info {r['artifact']}", highlight=False)


@app.command("methods")
def methods_command(name: Annotated[Optional[str], typer.Argument(help="Show one method's options.")] = None):
    """List the ensembling methods, or one method's options with their defaults."""
    import dataclasses

    from .methods import get_method, list_methods

    names = [name] if name else list_methods()
    for n in names:
        cls = get_method(n)
        console.print(f"[bold]{n}[/]: {cls.summary}")
        if name:
            table = Table(show_header=True, box=None)
            table.add_column("option")
            table.add_column("default", justify="right")
            table.add_column("meaning")
            for f in dataclasses.fields(cls.Config):
                default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
                table.add_row("--" + f.name.replace("_", "-"), str(default), f.metadata.get("help", ""))
            console.print(table)


# ------------------------------------------------------------------------------------ ensemble
@app.command("ensemble")
def ensemble_command(
    models: Annotated[list[str], typer.Argument(help="Two or more model specs of one label space.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact directory to write.")],
    combine: Annotated[str, typer.Option("--combine", help="prob_mean, logit_mean or vote.")] = "prob_mean",
    arch: ArchOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out.")] = False,
):
    """Build a deep-ensemble artifact from several checkpoints (members may differ in architecture)."""
    from .artifact import save
    from .ensemble import Combine, Ensemble
    from .sources import is_artifact, load_model, member_name

    if len(models) < 2:
        raise PosthocError("an ensemble needs at least two models")
    if combine == "coupling":
        raise PosthocError("the coupling rule needs training; use 'posthoc boost ... --method supernet'")
    from .artifact import check_output

    check_output(out, overwrite)
    nets = []
    for spec in models:
        if is_artifact(spec):
            raise PosthocError(f"{spec} is already an ensemble artifact; pass the checkpoints it was built from")
        net = load_model(spec, arch=arch)
        if getattr(net, "returns_probabilities", False):
            raise PosthocError(f"{spec} is already an ensemble artifact; pass the checkpoints it was built from")
        nets.append(net)
    _check_label_space(models, nets)
    names = [member_name(s) for s in models]
    ens = Ensemble.from_models(
        nets, names=names, combine=Combine(rule=combine), method="ensemble",
        method_config={"combine": combine}, sources=list(models), command=_command_line(),
    )
    save(ens, out, overwrite=overwrite)
    console.print(f"wrote {out} ({ens.num_members} members, {len(ens.groups)} architecture group(s))")


def _check_label_space(specs: list[str], nets: list) -> None:
    first = nets[0]
    for spec, net in zip(specs[1:], nets[1:]):
        if net.num_classes != first.num_classes:
            raise PosthocError(f"{spec} predicts {net.num_classes} classes but {specs[0]} predicts {first.num_classes}; members must share a label space")
        a, b = first.pretrained_cfg.get("label_names"), net.pretrained_cfg.get("label_names")
        if a and b and list(a) != list(b):
            raise PosthocError(f"{spec} orders its classes differently from {specs[0]}; members must share a label space")


def _command_line() -> str:
    import shlex

    return "posthoc " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# ---------------------------------------------------------------------------------------- info
@app.command("info")
def info_command(artifact: Annotated[str, typer.Argument(help="An artifact directory or hf-hub:org/name.")]):
    """Show an artifact's members, method, what is shared, sizes and stored metrics."""
    from .artifact import read_config, resolve, size_mb

    path = resolve(artifact)
    config = read_config(path)
    method = config["method"]
    combine = config["combine"]
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("artifact", str(artifact))
    table.add_row("method", method["name"])
    table.add_row("members", f"{config['num_members']}: " + ", ".join(m["name"] for m in config["members"]))
    rule = combine["rule"] + (f" (temperature {combine['temperature']:.3g})" if combine.get("temperature", 1) != 1 else "")
    table.add_row("combine", rule + (", parent included" if combine.get("include_parent") else ""))
    table.add_row("classes", str(config["num_classes"]))
    for g, group in enumerate(config["groups"]):
        stacked = group["member_tensors"]
        total = group["shared_numel"] + group["member_numel"] // max(len(group["members"]), 1)
        share = 100.0 * group["shared_numel"] / max(total, 1)
        table.add_row(
            f"group {g}",
            f"{group['timm_config']['architecture']} x{len(group['members'])}: {len(group['shared_tensors'])} tensors shared "
            f"({group['shared_numel'] / 1e6:.2f}M elements, {share:.0f}% of a member), {len(stacked)} member-specific "
            f"({group['member_numel'] / 1e6:.2f}M elements in all)",
        )
        if stacked:
            table.add_row("", "member-specific: " + _summarize(stacked))
    stored = sum(g["shared_numel"] + g["member_numel"] for g in config["groups"])
    table.add_row("stored elements", f"{stored / 1e6:.2f}M")
    table.add_row("size on disk", f"{size_mb(path):.1f} MB")
    meta = config["posthoc"]
    table.add_row("built with", f"posthoc {meta['posthoc_version']}, torch {meta['torch_version']}, timm {meta['timm_version']}")
    if method.get("config"):
        table.add_row("hyper-parameters", ", ".join(f"{k}={v}" for k, v in method["config"].items()))
    for split, metrics in (config.get("metrics") or {}).items():
        if isinstance(metrics, dict):
            table.add_row(f"metrics ({split})", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))))
    console.print(table)


# ---------------------------------------------------------------------------------------- push
@app.command("push")
def push_command(
    artifact: Annotated[Path, typer.Argument(help="An artifact directory.")],
    repo: Annotated[str, typer.Option("--repo", help="Hub model repository, org/name (created if absent).")],
    private: Annotated[Optional[bool], typer.Option("--private/--public", help="Visibility of a new repository.")] = None,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to commit to (created if absent).")] = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")] = False,
    message: Annotated[Optional[str], typer.Option("--message", "-m", help="Commit message.")] = None,
    token: Annotated[Optional[str], typer.Option("--token", help="Hub token (default: hf auth login / HF_TOKEN).", show_default=False)] = None,
):
    """Upload an artifact to the Hugging Face Hub with its model card; load it back as hf-hub:org/name."""
    from .hub import hub_spec, push, split_repo

    url = push(artifact, repo, private=private, revision=revision, create_pr=create_pr, commit_message=message, token=token)
    spec = escape(hub_spec(split_repo(repo)[0], None if create_pr else revision))
    if create_pr:
        console.print(f"opened pull request {escape(url)}; once it is merged, load it with posthoc.load(\"{spec}\")", highlight=False)
        return
    console.print(f"pushed {escape(str(artifact))} to {escape(url)}", highlight=False)
    console.print(f"load it with posthoc.load(\"{spec}\") or `posthoc eval {spec} --data DATA`", highlight=False)


def _summarize(names: list[str], limit: int = 6) -> str:
    """Tensor names grouped by their module prefix, e.g. 'layer4.* (30), fc.* (2)'."""
    groups: dict[str, int] = {}
    for n in names:
        parts = n.split(".")
        key = ".".join(parts[:2]) if len(parts) > 2 else parts[0]
        groups[key] = groups.get(key, 0) + 1
    items = [f"{k}.* ({v})" for k, v in groups.items()]
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ----------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status; :class:`PosthocError` becomes one line and status 2."""
    try:
        app(args=argv, prog_name="posthoc")
    except SystemExit as e:  # typer/click exit normally, and on usage errors (status 2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except PosthocError as e:
        err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        return PosthocError.exit_code
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        return 130
    return 0


def entrypoint() -> None:  # pragma: no cover - console script
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entrypoint()
