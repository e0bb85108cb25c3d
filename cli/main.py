"""The `kiln` command: a thin Typer app. Each subcommand module imports its heavy code lazily,
inside the command function, so that `kiln --help` stays instant."""

from __future__ import annotations

import sys

import typer

from cli import bench, convert, generate, openai_gateway, repo, serve, train
from cli.errors import run_cli

app = typer.Typer(
    name="kiln",
    help="Kiln: build, run, serve and benchmark LLM inference engines.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

for module in (generate, convert, repo, serve, openai_gateway, bench, train):
    module.register(app)


def main() -> None:
    run_cli(app, sys.argv[1:])


if __name__ == "__main__":
    main()
