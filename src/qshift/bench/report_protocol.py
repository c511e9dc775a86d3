"""The report's protocol lines: which protocol knobs (docs/method.md §2) the cells ran under, so that a
table made under another learning rate, step count, … (or with cut streams) never passes for one made
under the defaults."""
from __future__ import annotations

from collections import defaultdict

from qshift.bench.report_load import Cell, protocol_deviations
from qshift.bench.report_tables import _order
from qshift.options import Protocol


def _defaults_line() -> str:
    d = Protocol.defaults()
    return (f"B = {d['batch_size']}, {d['steps']} inner steps, {d['optimizer']} with weight decay {d['weight_decay']:g}, "
            f"scoring `{d['scoring']}`, reset `{d['reset']}`, lr: each backbone's protocol rate")


def _n_cells(n: int) -> str:
    return f"{n} cell" if n == 1 else f"{n} cells"


def protocol_notes(cells: list[Cell]) -> list[str]:
    """Lines saying which protocol the cells ran under, so a table made under another learning rate,
    step count, … (or with cut streams) can never pass for one made under docs/method.md §2."""
    groups: dict[tuple, list[Cell]] = defaultdict(list)
    for c in cells:
        groups[tuple(sorted(protocol_deviations(c.protocol).items()))].append(c)
    lines = []
    if set(groups) == {()}:
        rates = sorted({c.protocol.get("lr") for c in cells if c.protocol.get("lr") is not None})
        lr = f" (here lr {', '.join(f'{r:g}' for r in rates)})" if rates else ""
        lines.append(f"Protocol: the defaults in every cell (docs/method.md §2: {_defaults_line()}{lr}).")
    else:
        n_dev = sum(len(v) for k, v in groups.items() if k)
        parts = []
        for dev, group in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            if not dev:
                continue
            labels = _order({c.label for c in group})
            knobs = ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}" for k, v in dev)
            parts.append(f"{knobs} ({_n_cells(len(group))}: {', '.join(labels)})")
        lines.append(f"**Protocol differs from the defaults (docs/method.md §2: {_defaults_line()}) in {n_dev} "
                     f"of {len(cells)} cells**: " + "; ".join(parts)
                     + (f". The other {_n_cells(len(groups[()]))} use its defaults." if () in groups else "."))
    cut = defaultdict(int)
    for c in cells:
        m, n = c.protocol.get("max_queries"), c.protocol.get("n_queries")
        # a stream shorter than the cap is scored whole; one at the cap (less rounding over its domains) was cut
        if m is not None and (n is None or n > m - max(len(c.per_domain), 1)):
            cut[m] += 1
    for m, k in sorted(cut.items()):
        lines.append(f"Streams longer than {m:,} queries subsampled to {m:,}, evenly over their domains (a grid "
                     f"setting): {_n_cells(k)}.")
    return lines
