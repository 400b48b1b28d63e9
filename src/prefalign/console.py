"""The command line's consoles and its one error format, shared by :mod:`prefalign.cli` and
:mod:`prefalign.generate.cli` (which would otherwise import each other)."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
err_console = Console(stderr=True)


def fail(message: str, code: int = 2) -> None:
    """Print ``error: MESSAGE`` on stderr (one line, paths kept whole) and exit with ``code``."""
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)
