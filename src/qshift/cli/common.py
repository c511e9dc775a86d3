"""What every ``qshift`` command shares: the Typer app, the consoles, the one-line error, shared options.

The command modules import the library inside each command, not at their top: ``qshift --help``,
``--version`` and ``cache info`` then start without loading torch (about 2 s on these machines)."""
from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

import qshift

#: what a command reports as one ``error:`` line and exit 2: the user's input was wrong (UserError is a
#: ValueError), a file is missing, or an object does not have the expected type
USER_ERRORS = (ValueError, FileNotFoundError, TypeError)

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Online test-time adaptation for cross-modal retrieval under query shift.")
console = Console()
err = Console(stderr=True, soft_wrap=True)  # one error line, never wrapped mid-path


def error(message: object) -> None:
    """One ``error:`` line on stderr; the message is escaped, so ``rest[lambda_a=1]`` is not read as markup.
    With ``QSHIFT_DEBUG=1`` an exception passed here is raised instead, so its traceback shows."""
    if isinstance(message, BaseException) and os.environ.get("QSHIFT_DEBUG"):
        raise message
    err.print(f"[red]error:[/red] {escape(str(message))}", highlight=False)

class Direction(str, Enum):
    i2t = "i2t"
    t2i = "t2i"
    both = "both"


class Split(str, Enum):
    test = "test"
    test1k = "test1k"
    val = "val"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"qshift {qshift.__version__}")
        raise typer.Exit()


@app.callback()
def app_options(version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                          help="Print the version and exit.")] = None) -> None:
    """qshift: REST, TCR and test-time adaptation baselines for cross-modal retrieval."""


# options shared by eval / run / diagnose for real backbones and datasets
ModelOpt = Annotated[str, typer.Option("--model", help="world | openclip:ARCH | hf-clip:PATH | hf-blip:PATH | "
                                                       "custom:module:factory")]
DatasetOpt = Annotated[Optional[str], typer.Option(help="A real dataset instead of the world: coco, flickr, cuhk-pedes, "
                                                        "icfg-pedes, nocaps[-in|-near|-out], fashiongen; benchmarks then "
                                                        "read coco/i2t, coco-c/i2t/fog/5, …")]
DataRootOpt = Annotated[Optional[Path], typer.Option(help="Folder with the dataset's images and annotation.")]
AnnotationOpt = Annotated[Optional[Path], typer.Option(help="Annotation file (default: the usual name in --data-root).")]
DeviceOpt = Annotated[str, typer.Option(help="cpu or cuda.")]
PreprocessOpt = Annotated[str, typer.Option(help="Image preprocessing of real backbones: model | tcr.")]
ModelOptionOpt = Annotated[Optional[list[str]], typer.Option(
    "--model-option", help="A backbone option key=value (repeatable), e.g. fusion=sum, combiner=combiner.pt "
                           "(a CLIP4Cir checkpoint, direction cir), quick_gelu=true.")]


def parse_model_options(items: Optional[list[str]]) -> dict:
    """``["fusion=sum", "alpha=0.3", "quick_gelu=true"]`` → ``{"fusion": "sum", "alpha": 0.3, "quick_gelu": True}``
    (``ValueError`` for an item without ``=``)."""
    out: dict = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--model-option wants key=value, got {item!r}")
        value: object = raw.strip()
        low = raw.strip().lower()
        if low in ("true", "false"):
            value = low == "true"
        else:
            for cast in (int, float):
                try:
                    value = cast(raw)
                    break
                except ValueError:
                    continue
        out[key.strip()] = value
    return out


WeightsOpt = Annotated[Optional[str], typer.Option(help="Weights: a world-model file, or a real backbone's tag / "
                                                        "checkpoint (default: the shipped world model).")]
