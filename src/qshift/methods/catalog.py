"""The methods catalogue: each registered method's summary and options, and the protocol's knobs, as
Markdown (the generated block of docs/methods.md and ``qshift methods``)."""
from __future__ import annotations

import inspect

from qshift.methods.base import available_methods, method_class
from qshift.options import Protocol, options_table

DOCS_START, DOCS_END = "<!-- qshift-options:start -->", "<!-- qshift-options:end -->"


def summary(name: str) -> str:
    """The first paragraph of method ``name``'s docstring, on one line."""
    doc = inspect.getdoc(method_class(name)) or ""
    return " ".join(doc.split("\n\n")[0].split()).replace("``", "`")


def options_markdown() -> str:
    """The protocol table, then one options table per method (every row from its declaration)."""
    parts = ["### The protocol (every method; `--set` in `qshift run`, `protocol:` in a grid)", "",
             options_table(Protocol)]
    for name in available_methods():
        opts = method_class(name).Options
        parts += ["", f"### `{name}`", "", summary(name), ""]
        parts.append(options_table(opts) if opts.names() else "No options of its own.")
    return "\n".join(parts)


def docs_block() -> str:
    """The generated block of docs/methods.md, markers included."""
    return (f"{DOCS_START}\n<!-- generated from the option declarations by `qshift methods --markdown` "
            f"(do not edit by hand) -->\n\n{options_markdown()}\n\n{DOCS_END}")
