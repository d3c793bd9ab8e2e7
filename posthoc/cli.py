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

from . import cli_tables as show
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
SPEC_HELP = "timm name[.tag], hf-hub:org/name, local-dir:PATH, a directory, an artifact, or a weights file."
ModelArg = Annotated[str, typer.Argument(help=SPEC_HELP, metavar="MODEL")]
ArtifactArg = Annotated[str, typer.Argument(help="An artifact directory or hf-hub:org/name.", metavar="ARTIFACT")]
MethodOpt = Annotated[str, typer.Option("--method", "-m", help="Method name; its options appear with --method NAME --help.")]


def _command_line() -> str:
    return "posthoc " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _given(options: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


def _version(value: bool) -> None:
    if value:
        from . import __version__

        show.console.print(f"posthoc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.", metavar="")
    ] = False,
):
    """Post-training ensembles for timm and Hugging Face Hub image classifiers."""


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

    rows = eval_models(models or [], on_result=show.eval_row, log=show.log, warn=show.warn, **_given(options))
    if len(rows) > 1:
        show.eval_rows(rows)
        failed = [r for r in rows if "error" in r]
        if failed:
            show.warn(f"{len(failed)} of {len(rows)} models failed (their rows hold the error)")
            raise typer.Exit(1)


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

    s = boost(
        models, method, log=show.log, warn=show.warn, command=_command_line(), **_given(options), **ctx.meta["method_options"]
    )
    show.boost_summary(s)


# ----------------------------------------------------------------------------------- calibrate
@app.command("calibrate", cls=Command)
@with_options(declared.CALIBRATE)
@on_rank_zero
def calibrate_command(model: ModelArg, options: dict[str, Any] | None = None):
    """Fit a temperature on the select part: a checkpoint becomes a calibrated one-member artifact; an artifact is re-calibrated."""
    from .commands.calibrate import calibrate

    r = calibrate(model, command=_command_line(), log=show.log, **_given(options))
    show.wrote(r["out"])


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

    r = distill(teacher, log=show.log, command=_command_line(), **_given(options))
    show.student(r)
    show.wrote(r["out"])


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

    r = run_demo(
        method, out, log=show.log, warn=show.warn, progress=progress, parent_epochs=parent_epochs, **ctx.meta["method_options"]
    )
    show.demo_summary(r, method)


# ------------------------------------------------------------------------------------- methods
@app.command("methods", cls=Command)
def methods_command(name: Annotated[Optional[str], typer.Argument(help="Show one method's options.", metavar="METHOD")] = None):
    """List the ensembling methods, or one method's options with their defaults."""
    from .methods import get_method, list_methods
    from .options import describe_options

    for n in [name] if name else list_methods():
        cls = get_method(n)
        show.console.print(f"[bold]{n}[/]: {show.safe(cls.summary)}")
        if name:
            show.rows_without_header(
                [(o["flag"], f"{o['help']} [default: {o['default']}]") for o in describe_options(cls.Config)]
            )


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

    ens = ensemble_checkpoints(models, out, command=_command_line(), warn=show.warn, **_given(options))
    show.console.print(
        f"wrote {show.safe(out)} ({ens.num_members} members, {len(ens.groups)} architecture group(s))", highlight=False
    )


# ---------------------------------------------------------------------------------------- info
@app.command("info", cls=Command)
@on_rank_zero
def info_command(artifact: ArtifactArg):
    """Show an artifact's members, method, what is shared, sizes and stored metrics."""
    from .commands.info import info

    show.rows_without_header([("artifact", artifact), *info(artifact)])


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

    url = push(artifact, warn=show.warn, **_given(options))
    create_pr, revision = options.get("create_pr"), options.get("revision")
    spec = hub_spec(split_repo(options["repo"])[0], None if create_pr else revision)
    if create_pr:
        return show.log(f'opened pull request {url}; once it is merged, load it with posthoc.load("{spec}")')
    show.log(f"pushed {artifact} to {url}")
    show.log(f'load it with posthoc.load("{spec}") or `posthoc eval {spec} --data DATA`')


# -------------------------------------------------------------------------------------- export
@app.command("export", cls=Command)
@with_options(declared.EXPORT)
@on_rank_zero
def export_command(artifact: ArtifactArg, options: dict[str, Any] | None = None):
    """Export an artifact as one ONNX, torch.export or AOTInductor file for serving engines (dynamic batch, probabilities out)."""
    from .commands.export import export_artifact

    show.exported(export_artifact(artifact, log=show.log, **_given(options)))


# ----------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit status; user errors become one line and status 2.

    Launched by torchrun (``WORLD_SIZE > 1``), every process runs the command (:mod:`posthoc.distributed`):
    ``eval`` and ``boost`` split their work, the other commands run on rank 0; only rank 0 prints, and a
    failure on any process ends all of them after rank 0 printed its one line.
    """
    return distributed.run(lambda: _run(argv), report=show.error)


def _run(argv: list[str] | None) -> int:
    show.console.quiet = show.err_console.quiet = not distributed.is_main()  # rank 0 prints for all processes
    command = typer.main.get_command(app)
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        result = command.main(args=args or ["--help"], prog_name="posthoc", standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except (typer.Abort, KeyboardInterrupt):
        show.err_console.print("[yellow]interrupted[/]")
        return 130
    except typer.TyperException as e:  # usage errors of the command-line parser
        ctx = getattr(e, "ctx", None)
        hint = f" (see posthoc {ctx.info_name} --help)" if ctx is not None and ctx.parent is not None else " (see posthoc --help)"
        show.error(f"{e.format_message()}{hint}")
        return e.exit_code
    return result if isinstance(result, int) else 0


def entrypoint() -> None:  # pragma: no cover - console script
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entrypoint()
