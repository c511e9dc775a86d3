"""``qshift methods``: every method's options and the protocol, from their declarations."""
from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from qshift.cli.common import (app, console, error as _error)
from qshift.options import Protocol


@app.command("methods")
def methods_cmd(
    name: Annotated[Optional[str], typer.Argument(help="One method (default: the protocol and every method).")]
    = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print docs/methods.md's generated block.")] = False,
) -> None:
    """Every method with its options (name, type, default, allowed values, what it does), and the protocol."""
    from qshift.methods.base import method_class
    from qshift.methods.catalog import docs_block, summary
    if markdown:
        typer.echo(docs_block())
        return
    try:
        names = [name] if name else None
        if names:
            method_class(name)
    except ValueError as e:
        _error(e)
        raise typer.Exit(2)
    from qshift.methods import available_methods

    if names is None:
        console.print("[bold]protocol[/bold] (every method)")
        _print_options(Protocol)
    for n in names or available_methods():
        console.print(f"\n[bold]{n}[/bold]: {escape(summary(n))}", highlight=False)
        opts = method_class(n).Options
        if opts.names():
            _print_options(opts)
        else:
            console.print("  no options of its own")


def _print_options(opts) -> None:
    table = Table(show_edge=False)
    for col in ("option", "type", "default", "allowed", "what it does"):
        table.add_column(col, overflow="fold")
    for r in opts.describe():
        table.add_row(r["name"], r["kind"], repr(r["default"]), r["allowed"].replace("`", ""), r["help"])
    console.print(table)
