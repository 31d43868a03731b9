"""The Typer application every command module registers its commands on."""

from __future__ import annotations

from typing import Annotated

import typer

from tuner.cli.versions import versions

app = typer.Typer(
    name="tuner",
    help="Hyperparameter tuning of Adam on CIFAR-10: train, sweep, report, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts contain [brackets] that are not markup
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _print_versions(value: bool) -> None:
    if value:
        for name, version in versions().items():
            print(f"{name} {version}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", help="Print the versions of tuner, Optuna and torch, and exit.", is_eager=True,
        callback=_print_versions)] = False,
) -> None:
    """Hyperparameter tuning of Adam on CIFAR-10: train, sweep, report, export."""
    import optuna  # optuna: not before tuner.cli has checked its version (an old one is one line, not a traceback)

    # a command runs: tuner prints its own lines, Optuna only its warnings

    optuna.logging.set_verbosity(optuna.logging.WARNING)
