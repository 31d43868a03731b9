"""`python -m tuner`: the `tuner` command."""

from tuner.cli import run

run()
