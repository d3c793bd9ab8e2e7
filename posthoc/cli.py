"""The ``posthoc`` command line: parses arguments, calls the commands (:mod:`posthoc.commands`), prints.

Every command's options are generated from its declared option groups (:mod:`posthoc.cli_options`), so
the command line, the Python functions and their checks are one; a method's options are flags of
``boost`` and ``demo`` (``posthoc boost --method NAME --help`` lists them). Every user error ends in one
line on stderr and exit status 2.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import command_options as declared
from . import distributed
from .cli_options import Command, DemoCommand, Group, MethodOptionsCommand, on_rank_zero, with_options
from .errors import PosthocError

app = typer.Typer(
    name="posthoc",
    cls=Group,
    help="Post-training ensembles for timm and Hugging Face Hub image classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)
console = Console()
err_console = Console(stderr=True)
SPEC_HELP = "timm name[.tag], hf-hub:org/name, local-dir:PATH, a directory, an artifact, or a weights file."
ModelArg = Annotated[str, typer.Argument(help=SPEC_HELP, metavar="MODEL")]
ArtifactArg = Annotated[str, typer.Argument(help="An artifact directory or hf-hub:org/name.", metavar="ARTIFACT")]
MethodOpt = Annotated[str, typer.Option("--method", "-m", help="Method name; its options appear with --method NAME --help.")]


def _log(message: str) -> None:
    """Progress messages from the library, printed verbatim (paths may contain [brackets])."""
    console.print(escape(message), highlight=False)


def _warn(message: str) -> None:
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def _command_line() -> str:
    return "posthoc " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _given(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def _version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"posthoc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.", metavar="")
    ] = False,
):
    """Post-training ensembles for timm and Hugging Face Hub image classifiers."""


def _table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


METRICS = (("top-1 (%)", "top1", "{:.2f}"), ("NLL", "nll", "{:.4f}"), ("ECE (%)", "ece", "{:.2f}"), ("Brier", "brier", "{:.4f}"))


def _wrote(path: str, seconds: float | None = None) -> None:
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    console.print(
        f"wrote {escape(path)}{took}; report on held-out data with `posthoc eval {escape(path)} --data DATA --split val:report`",
        highlight=False,
    )


# ---------------------------------------------------------------------------------------- eval
@app.command("eval", cls=Command)
@with_options(declared.EVAL)
def eval_command(
    models: Annotated[
        Optional[list[str]],
        typer.Argument(help="Model specs (timm names with wildcards like 'resnet5*.a1_in1k', or as above).", metavar="MODEL"),
    ] = None,
    options: dict[str, Any] | None = None,
):
    """Evaluate models or ensemble artifacts: top-1/top-5 (as timm's validate.py), NLL, ECE, Brier, throughput."""
    from .commands.eval import eval_models

    def show(row: dict[str, Any], single: bool) -> None:
        if single:
            _print_result(row)
        elif "error" in row:
            err_console.print(f"[red]{escape(row['model'])}: {escape(row['error'])}[/]", highlight=False, soft_wrap=True)
        else:
            console.print(
                f"{escape(row['model'])}: top-1 {row['top1']:.2f}%, NLL {row['nll']:.4f} ({row['images']} images)",
                highlight=False,
            )

    rows = eval_models(models or [], on_result=show, log=_log, warn=_warn, **_given(options))
    if len(rows) == 1:
        return
    columns = (
        ("top1", "{:.2f}"),
        ("top5", "{:.2f}"),
        ("nll", "{:.4f}"),
        ("ece", "{:.2f}"),
        ("param_count", "{:.2f}"),
        ("throughput", "{:.0f}"),
    )
    cells = [
        [escape(r["model"]), *(["[red]failed[/]"] + [""] * 5 if "error" in r else [f.format(r[k]) for k, f in columns])]
        for r in rows
    ]
    headings = ["model", "top-1 (%)", "top-5 (%)", "NLL", "ECE (%)", "params (M)", "img/s"]
    _table(f"{len(rows)} models on {rows[0].get('split', '')}", headings, cells)
    failed = [r for r in rows if "error" in r]
    if failed:
        _warn(f"{len(failed)} of {len(rows)} models failed (their rows hold the error)")
        raise typer.Exit(1)


def _print_result(result: dict[str, Any]) -> None:
    fields = [
        *METRICS[:1],
        ("top-5 (%)", "top5", "{:.2f}"),
        *METRICS[1:],
        ("members", "members", "{}"),
        ("mean member top-1 (%)", "member_top1", "{:.2f}"),
        ("disagreement (%)", "disagreement", "{:.2f}"),
        ("params (M)", "param_count", "{:.2f}"),
        ("throughput (img/s)", "throughput", "{:.0f}"),
    ]
    rows = [[label, fmt.format(result[key])] for label, key, fmt in fields if result.get(key) is not None]
    _table(escape(f"{result['model']} on {result.get('split', '')} ({result['images']} images)"), ["metric", "value"], rows)
    if result.get("skipped_images"):
        _warn(f"skipped {result['skipped_images']} unreadable image(s); the metrics cover the other {result['images']}")


# --------------------------------------------------------------------------------------- boost
SWITCH_VALUES = {"true", "false", "yes", "no", "on", "off", "0", "1"}


@app.command("boost", cls=MethodOptionsCommand)
@with_options(declared.BOOST)
def boost_command(
    ctx: typer.Context,
    models: Annotated[
        list[str], typer.Argument(help="The parent model (several for methods that merge checkpoints).", metavar="MODEL")
    ],
    method: MethodOpt,
    options: dict[str, Any] | None = None,
):
    """Build an ensemble artifact from a checkpoint with a post-training method.

    The method's own options (e.g. `--members 9 --target-kl 0.05` for noisy) are listed by
    `posthoc boost --method NAME --help`.
    """
    for spec in models[1:]:  # `--include-parent false` hands 'false' to the models list
        if spec.lower() in SWITCH_VALUES and not Path(spec).exists():
            raise PosthocError(
                f"'{spec}' looks like a value for an on/off option, which takes none: write --NAME to switch it on and "
                "--no-NAME to switch it off (e.g. --no-include-parent)"
            )
    from .commands.boost import boost

    s = boost(models, method, log=_log, warn=_warn, command=_command_line(), **_given(options), **ctx.meta["method_options"])
    ens, par, cost = s["ensemble"], s["parent"], s["cost"]
    rows = [
        [label, fmt.format(par[k]), fmt.format(ens[k]), ("{:+" + fmt[2:]).format(ens[k] - par[k])] for label, k, fmt in METRICS
    ]
    rows += [
        ["members", "1", str(cost["members"]), ""],
        ["parameters (M)", "", f"{cost['parameters'] / 1e6:.2f}", ""],
        ["forward FLOPs (x parent)", "1.00", f"{cost['flops_ratio']:.2f}", ""],
        ["forward time (x parent, this machine)", "1.00", f"{cost['time_ratio']:.2f}", ""],
    ]
    _table(
        f"validation (select part): parent vs {s['members']}-member ensemble", ["metric", "parent", "ensemble", "change"], rows
    )
    if s["student"]:
        _print_student(s["student"])
    _wrote(s["student"]["out"] if s["student"] else s["out"], s["seconds"])


def _print_student(r: dict[str, Any]) -> None:
    rows = [[label, *(fmt.format(r[w][k]) for w in ("before", "teacher", "student"))] for label, k, fmt in METRICS[:3]]
    rows.append(["forward FLOPs (x parent)", "1.00", f"{r['teacher_flops_ratio']:.2f}", "1.00"])
    _table("distilled student on the select part (1 network)", ["metric", "parent", "teacher", "student"], rows)
    console.print(f"distillation cost: about {r['cost_parent_epochs']:.2f} parent-epochs (from FLOPs)", highlight=False)


# ----------------------------------------------------------------------------------- calibrate
@app.command("calibrate", cls=Command)
@with_options(declared.CALIBRATE)
@on_rank_zero
def calibrate_command(model: ModelArg, options: dict[str, Any] | None = None):
    """Fit a temperature on the select part: a checkpoint becomes a calibrated one-member artifact; an artifact is re-calibrated."""
    from .commands.calibrate import calibrate

    r = calibrate(model, command=_command_line(), log=_log, **_given(options))
    _wrote(r["out"])


# ------------------------------------------------------------------------------------- distill
@app.command("distill", cls=Command)
@with_options(declared.DISTILL)
@on_rank_zero
def distill_command(
    teacher: ArtifactArg,
    options: dict[str, Any] | None = None,
):
    """Distil an ensemble artifact into one network (1x inference): knowledge distillation or the consensus loss."""
    from .commands.distill import distill

    r = distill(teacher, log=_log, command=_command_line(), **_given(options))
    _print_student(r)
    _wrote(r["out"])


# ---------------------------------------------------------------------------------------- demo
@app.command("demo", cls=DemoCommand)
@on_rank_zero
def demo_command(
    ctx: typer.Context,
    method: MethodOpt = "resample",
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Where the digits, the parent and the artifact go.", metavar="DIR")
    ] = Path("runs/demo"),
    parent_epochs: Annotated[int, typer.Option("--parent-epochs", help="Epochs to train the demo parent.", metavar="N")] = 6,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show progress bars.", metavar="")] = True,
):
    """Offline demo on real data shipped with scikit-learn: train a small parent, boost it, compare."""
    from .commands.demo import run_demo

    r = run_demo(method, out, log=_log, warn=_warn, progress=progress, parent_epochs=parent_epochs, **ctx.meta["method_options"])
    rows = [[label, fmt.format(r["parent"][k]), fmt.format(r[method][k])] for label, k, fmt in METRICS]
    rows.append(["members", "1", str(r[method].get("members", 1))])
    _table(f"held-out digits ({r['images']} images, never used for training or tuning)", ["metric", "parent", method], rows)
    console.print(
        f"artifact: {escape(r['artifact'])} (built in {r['build_seconds']:.0f} s; whole demo {r['seconds']:.0f} s). "
        f"Next: posthoc info {escape(r['artifact'])}",
        highlight=False,
    )


# ------------------------------------------------------------------------------------- methods
@app.command("methods", cls=Command)
def methods_command(name: Annotated[Optional[str], typer.Argument(help="Show one method's options.", metavar="METHOD")] = None):
    """List the ensembling methods, or one method's options with their defaults."""
    from .methods import get_method, list_methods
    from .options import describe_options

    for n in [name] if name else list_methods():
        cls = get_method(n)
        console.print(f"[bold]{n}[/]: {escape(cls.summary)}")
        if name:
            table = Table(show_header=True, box=None)
            for column, justify in (("option", "left"), ("default", "right"), ("meaning", "left")):
                table.add_column(column, justify=justify)
            for opt in describe_options(cls.Config):
                table.add_row(opt["flag"], escape(str(opt["default"])), escape(opt["help"]))
            console.print(table)


# ------------------------------------------------------------------------------------ ensemble
@app.command("ensemble", cls=Command)
@with_options(declared.ENSEMBLE)
@on_rank_zero
def ensemble_command(
    models: Annotated[list[str], typer.Argument(help="Two or more model specs of one label space.", metavar="MODEL")],
    options: dict[str, Any] | None = None,
):
    """Build a deep-ensemble artifact from several checkpoints (members may differ in architecture)."""
    out = options.pop("out")
    from .commands.boost import ensemble_checkpoints

    ens = ensemble_checkpoints(models, out, command=_command_line(), warn=_warn, **_given(options))
    console.print(
        f"wrote {escape(str(out))} ({ens.num_members} members, {len(ens.groups)} architecture group(s))", highlight=False
    )


# ---------------------------------------------------------------------------------------- info
@app.command("info", cls=Command)
@on_rank_zero
def info_command(artifact: ArtifactArg):
    """Show an artifact's members, method, what is shared, sizes and stored metrics."""
    from .commands.info import info

    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("artifact", escape(artifact))
    for label, text in info(artifact):
        table.add_row(label, escape(text))
    console.print(table)


# ---------------------------------------------------------------------------------------- push
@app.command("push", cls=Command)
@with_options(declared.PUSH)
@on_rank_zero
def push_command(
    artifact: Annotated[Path, typer.Argument(help="An artifact directory.", metavar="ARTIFACT")],
    options: dict[str, Any] | None = None,
):
    """Upload an artifact to the Hugging Face Hub with its model card; load it back as hf-hub:org/name."""
    from .commands.push import push
    from .hub import hub_spec, split_repo

    url = push(artifact, warn=_warn, **_given(options))
    create_pr, revision = options.get("create_pr"), options.get("revision")
    spec = escape(hub_spec(split_repo(options["repo"])[0], None if create_pr else revision))
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
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        result = command.main(args=args or ["--help"], prog_name="posthoc", standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        err_console.print("[yellow]interrupted[/]")
        return 130
    except typer.TyperException as e:  # usage errors of the command-line parser
        ctx = getattr(e, "ctx", None)
        hint = f" (see posthoc {ctx.info_name} --help)" if ctx is not None and ctx.parent is not None else " (see posthoc --help)"
        err_console.print(f"[bold red]error:[/] {escape(e.format_message())}{hint}", highlight=False, soft_wrap=True)
        return e.exit_code
    return result if isinstance(result, int) else 0


def entrypoint() -> None:  # pragma: no cover - console script
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entrypoint()
