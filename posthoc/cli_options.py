"""Declared options as typer flags: the one place that turns :mod:`posthoc.options` fields into a command line.

A field ``target_kl`` becomes ``--target-kl``, a boolean ``--x/--no-x`` (no value placeholder shown),
choices a ``Literal``, and the help text carries the default and the bounds; fields renamed in this
release get a hidden flag with their old spelling. :func:`with_options` gives a command the flags of a
:class:`~posthoc.options.CommandOptions`, one help panel per group, and hands their values to the
command in one dict; :func:`method_params` gives ``boost`` and ``demo`` the flags of the method named by
``--method``. Values are only parsed here: they are checked where they are used, by
:func:`posthoc.options.make_config`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from . import distributed
from .options import REQUIRED, CommandOptions, Options, describe_options, flag, number_text

METAVARS = {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH"}


def option_help(opt: dict[str, Any]) -> str:
    """An option's help text with its default and bounds, as ``--help`` shows it."""
    bounds = [
        f"{word} {number_text(opt[k])}"
        for k, word in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
        if opt.get(k) is not None
    ]
    default = opt["default"]
    if isinstance(default, bool):
        default = {False: "off", True: "on"}[default]
    notes = ([f"default: {default}"] if default is not None and default is not REQUIRED else []) + bounds
    return escape(opt["help"] + (f" [{'; '.join(notes)}]" if notes else ""))


def _parameter(name: str, opt: dict[str, Any], panel: str, *, decl: str | None = None, hidden: bool = False, help_text=None):
    """One typer keyword parameter for a described option."""
    kind = opt["type"]  # choices are checked by make_config, with the flag and the accepted values in one line
    decl = decl or opt["flag"]
    switch_off = kind is bool and decl.startswith("--") and opt["default"] is not False  # --no-x only where x can be on
    decls = [f"{decl}/{opt.get('off_flag') or '--no-' + decl[2:]}" if switch_off else decl]
    if opt.get("short") and not hidden:
        decls.append(opt["short"])
    required = opt["default"] is REQUIRED and not hidden
    metavar = "" if kind is bool else opt.get("metavar") or ("|".join(opt["choices"]) if opt["choices"] else METAVARS.get(kind))
    info = typer.Option(
        *decls,
        help=help_text if help_text is not None else option_help(opt),
        hidden=hidden,
        show_default=False,
        rich_help_panel=panel,
        metavar=metavar,
    )
    annotation = Annotated[kind if required else Optional[kind], info]
    default = inspect.Parameter.empty if required else None
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def parameters(group: type[Options], fields: list[dict[str, Any]], panel: str) -> list[inspect.Parameter]:
    """Typer parameters for ``fields`` of ``group`` (hidden ones for its renamed fields)."""
    by_name = {o["name"]: o for o in describe_options(group)}
    params = [_parameter(o["name"], o, panel) for o in fields]
    taken = {o["name"] for o in fields}
    for old, rename in group.renamed.items():
        if rename.new in taken:
            new = by_name[rename.new]
            spelling = rename.spelling or flag(old)
            old_opt = (
                {**new, "short": None} if rename.kind is None else {**new, "short": None, "type": rename.kind, "choices": None}
            )
            params.append(
                _parameter(old, old_opt, panel, decl=spelling, hidden=True, help_text=f"Deprecated: use {new['flag']}.")
            )
    return params


def with_options(spec: CommandOptions) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a typer command every option of ``spec`` (one help panel per group).

    The decorated function keeps its own parameters (arguments, ``ctx``) and receives the options as
    one dict in its ``options`` parameter, only those given (``None`` for the others), ready for the
    command's Python function, which applies the defaults and checks them.
    """

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "options"]
        generated = []
        for group in spec.groups:
            panel = group.panel or group.__name__
            generated += parameters(group, spec.fields(group), panel)
        names = [p.name for p in generated]

        @functools.wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            options = {n: kwargs.pop(n) for n in names if n in kwargs}
            return command(*args, options=options, **kwargs)

        hints = {p.name: p.annotation for p in own}
        run.__signature__ = inspect.Signature(own + generated)
        run.__annotations__ = {**hints, **{p.name: p.annotation for p in generated}}
        del run.__wrapped__  # typer must read the generated signature, not the function's own
        return run

    return decorate


def method_params(name: str) -> list:
    """Typer options for every config field of method ``name`` (hidden ones for renamed fields), built by
    typer itself from a generated signature, so they parse, convert and show help like any other."""
    from .methods import get_method

    config_cls = get_method(name).Config
    params = parameters(config_cls, describe_options(config_cls), f"Options of method '{name}'")

    def options(**values):  # pragma: no cover - only its signature is used
        return values

    options.__signature__ = inspect.Signature(params)
    options.__annotations__ = {p.name: p.annotation for p in params}
    holder = typer.Typer(add_completion=False)
    holder.command()(options)
    built = typer.main.get_command(holder).params
    for p in built:
        p.method_option = True
    return built


# ------------------------------------------------------------------------------- command classes
class _PlainHelpFlag:
    """``--help`` without a value placeholder (it takes none)."""

    def get_help_option(self, ctx):
        option = super().get_help_option(ctx)
        if option is not None:
            option.metavar = ""
        return option


class Command(_PlainHelpFlag, TyperCommand):
    """Every posthoc command."""


class Group(_PlainHelpFlag, TyperGroup):
    """The ``posthoc`` command group."""


class MethodOptionsCommand(Command):
    """A command whose flags include the options of the method named by ``--method`` (``-m``): read from the
    arguments before parsing, they reach the command in ``ctx.meta["method_options"]`` (only those given)."""

    default_method: str | None = None

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        base = [p for p in self.params if not getattr(p, "method_option", False)]
        name = next((args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--method", "-m")), None)
        name = name or next((a.split("=", 1)[1] for a in args if a.startswith("--method=")), None) or self.default_method
        self.params = base + (method_params(name) if name else [])
        return super().parse_args(ctx, args)

    def invoke(self, ctx) -> Any:
        names = [p.name for p in self.params if getattr(p, "method_option", False)]
        given = {n: ctx.params.pop(n) for n in names if n in ctx.params}
        ctx.meta["method_options"] = {n: v for n, v in given.items() if v is not None}
        return super().invoke(ctx)


class DemoCommand(MethodOptionsCommand):
    default_method = "resample"


def on_rank_zero(command: Callable[..., Any]) -> Callable[..., Any]:
    """A command that does not split its work: under torchrun rank 0 runs it while the others wait."""

    @functools.wraps(command)
    def run_on_rank_zero(*args: Any, **kwargs: Any) -> Any:
        return distributed.on_main(lambda: command(*args, **kwargs))

    return run_on_rank_zero
