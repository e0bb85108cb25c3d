"""How every Kiln command reports failure: one red line naming the problem, exit code 2."""

from __future__ import annotations

from collections.abc import Sequence

import typer
from rich.console import Console

from engine.errors import KilnError

err_console = Console(stderr=True, soft_wrap=True)  # one line, never wrapped at 80 columns


def run_cli(app: typer.Typer, argv: Sequence[str]) -> None:
    try:
        app(list(argv), standalone_mode=True)
    except KilnError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted[/]")
        raise SystemExit(130) from None
