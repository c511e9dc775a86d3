"""``qshift cache info`` / ``qshift cache clear``: the on-disk cache of shifted query sets."""
from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from qshift.bench.cache import cache_clear, cache_info
from qshift.cli.common import app, console

cache_app = typer.Typer(no_args_is_help=True, help="Inspect or clear the cache of shifted query sets.")
app.add_typer(cache_app, name="cache")


def _mb(n: int | None) -> str:
    return "unbounded" if n is None else f"{n / 2**20:,.1f} MB"


@cache_app.command("info")
def cache_info_cmd(
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a summary.")] = False,
) -> None:
    """Where the cache is, its size bound (QSHIFT_CACHE_MAX_MB), and what it holds by kind."""
    info = cache_info()
    if as_json:
        typer.echo(json.dumps(info))
        return
    if not info["enabled"]:
        console.print("cache: off (QSHIFT_CACHE=off)")
        return
    console.print(f"cache: {info['folder']}\nbound: {_mb(info['max_bytes'])} (least recently used entries are "
                  f"evicted past it; QSHIFT_CACHE_MAX_MB sets it)\nholds: {info['entries']} entries, "
                  f"{_mb(info['total_bytes'])}", highlight=False)
    for kind, slot in info["kinds"].items():
        console.print(f"  {kind}: {slot['entries']} entries, {_mb(slot['bytes'])}", highlight=False)
    if info["legacy"]["entries"]:
        console.print(f"  old-format entries (never read; `qshift cache clear` removes them): "
                      f"{info['legacy']['entries']}, {_mb(info['legacy']['bytes'])}", highlight=False)
    if info["oldest"]:
        console.print(f"last used: oldest {info['oldest']}, newest {info['newest']}", highlight=False)


@cache_app.command("clear")
def cache_clear_cmd(
    kind: Annotated[Optional[str], typer.Option(help="Only entries of this kind (render, corrupt, perturb, …).")]
    = None,
) -> None:
    """Remove the cached query sets (all, or one kind); they are rebuilt when next needed."""
    n, freed = cache_clear(kind)
    console.print(f"removed {n} entries ({_mb(freed)})", highlight=False)
