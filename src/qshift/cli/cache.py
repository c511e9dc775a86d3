"""``qshift cache info`` / ``qshift cache clear``: the on-disk cache of shifted query sets."""
from __future__ import annotations


import typer

from qshift.cli.common import app

cache_app = typer.Typer(no_args_is_help=True, help="Inspect or clear the cache of shifted query sets.")
app.add_typer(cache_app, name="cache")
