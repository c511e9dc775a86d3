"""The ``qshift`` command line: one module per group of commands, all on one Typer app (cli/common.py)."""
from __future__ import annotations

import os
import sys

from rich.markup import escape

from qshift.cli import cache, evaluate, grids, index, methods, serve, shifts, train  # noqa: F401  (register the commands)
from qshift.cli.common import app, err, error as _error  # noqa: F401  (the public names)

__all__ = ["app", "main"]


def main() -> None:
    """The ``qshift`` entry point: bad input that a command did not catch itself (a malformed weights
    file, a wrong option) or a run that went non-finite ends with one ``error:`` line and exit status 2
    instead of a traceback; ``QSHIFT_DEBUG=1`` shows the traceback."""
    try:
        app()
    except (ValueError, FileNotFoundError, TypeError, KeyError, FloatingPointError) as e:
        if os.environ.get("QSHIFT_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        kind = f"{type(e).__name__}: " if isinstance(e, (TypeError, KeyError, FloatingPointError)) else ""
        err.print(f"[red]error:[/red] {escape(kind + str(msg))} (QSHIFT_DEBUG=1 shows where)", highlight=False)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
