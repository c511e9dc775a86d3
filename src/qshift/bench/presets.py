"""The built-in grids (``qshift bench --preset NAME``): the methods table, the diverse streams, the REST
ablations and the demo."""
from __future__ import annotations

from typing import Any

from qshift.bench.grid_spec import BASELINES, GridSpec

_C16 = "world-c/i2t/*/5"
_CHAR6 = ["world-c/t2i/keyboard/6", "world-c/t2i/ocr/6", "world-c/t2i/char_insert/6",
          "world-c/t2i/char_substitute/6", "world-c/t2i/char_swap/6", "world-c/t2i/char_delete/6"]
_TABLE = ["world-clean/i2t", "world-clean/t2i", "world-c/i2t/*/5", "world-c/i2t/*/3", "world-c/t2i/*/6",
          "world-qgs/*/i2t", "world-qgs/*/t2i"]
_ABLATION_BENCHMARKS = ["world-diverse/i2t/mix8/order0", "world-c/i2t/gaussian_noise/5", "world-c/i2t/contrast/5",
                        "world-c/i2t/zoom_blur/5", "world-c/t2i/keyboard/6"]


def _rest(label: str, **options: Any) -> dict[str, Any]:
    return {"name": "rest", "label": f"rest[{label}]", "options": options}


#: the switches the methods issue asks the REST ablation for: each loss term, each decoupling signal,
#: mode and granularity
_SWITCHES = [_rest("no-decoupling", decoupling=False), _rest("no-consistency", consistency="off"),
             _rest("no-uniformity", lambda_u=0.0), _rest("no-gap", lambda_g=0.0), _rest("reliable", signal="reliable"),
             _rest("memory", signal="memory"), _rest("always", mode="always"), _rest("per-tensor", granularity="per-tensor")]
PRESETS: dict[str, dict[str, Any]] = {
    # every method on the severity-5 corruptions and level-6 character perturbations
    "world-qs": {"methods": list(BASELINES), "benchmarks": [_C16, *_CHAR6]},
    "world-qgs": {"methods": list(BASELINES), "benchmarks": ["world-qgs/*/i2t", "world-qgs/*/t2i"]},
    # the README grid: world-qs plus the diverse streams for source / tcr / rest
    "world-readme": {"methods": list(BASELINES),
                     "benchmarks": [_C16, *_CHAR6, "world-diverse/i2t/c8-s5/order*"],
                     "only": {"world-diverse/*": ["source", "tcr", "rest"]},
                     "diagnostics": ["world-c/i2t/gaussian_noise/5", "world-c/i2t/contrast/5", "world-c/t2i/keyboard/6"]},
    # the methods issue's table: every method, 1 seed, on clean queries (the control), the 16 corruptions at
    # severities 5 and 3, every text perturbation at level 6 and the QGS domains; run world-3seeds into the
    # same folder for seeds 1 and 2 of source / tcr / rest (seed-0 cells are shared, not rerun)
    "world-methods": {"methods": list(BASELINES), "benchmarks": _TABLE},
    "world-3seeds": {"methods": ["source", "tcr", "rest"], "benchmarks": _TABLE, "seeds": [0, 1, 2]},
    # diverse shift: an i2t stream through 8 domains mixing corruptions and render domains, a t2i stream
    # mixing text perturbations and caption styles, 3 domain orders each
    # (750 queries per domain, 6,000 per stream, so the 36 cells fit in about half an hour on 2 cores)
    "world-diverse": {"methods": ["source", "tent", "eta", "sar", "tcr", "rest"],
                      "benchmarks": ["world-diverse/i2t/mix8/order*", "world-diverse/t2i/mix8/order*"],
                      "max_queries": 6000},
    # REST ablation: each switch of docs/method.md §4–§5 against the default, on a diverse stream (online
    # mean vs clean R@1 after it: the Pareto pair) and four severe corruptions
    "rest-ablation": {"methods": [
        "tcr", "rest", *_SWITCHES[:2], _rest("mutual", consistency="mutual"), *_SWITCHES[2:],
        *(_rest(f"lambda_a={v:g}", lambda_a=v) for v in (0.01, 0.03, 0.3, 1.0))],
        "benchmarks": _ABLATION_BENCHMARKS, "max_queries": 6000},
    # the methods issue's switches (each loss term, each decoupling signal / mode / granularity) on the
    # whole severity-5 family, for its mean (tcr and rest themselves are in the methods table); run it into
    # the rest-ablation folder and the cells of the three corruptions above are shared, not rerun
    "rest-ablation-s5": {"methods": _SWITCHES, "benchmarks": [_C16],
                         "max_queries": 6000},  # the cap of rest-ablation (no corruption reaches it)
    # the remaining switches (optimiser, metric, anchor placement, queue refresh), same benchmarks
    "rest-ablation-extra": {"methods": [
        {"name": "rest", "label": "rest[adam-metric]", "options": {"precondition": "adam"}},
        {"name": "rest", "label": "rest[sgd]", "options": {"optimizer": "sgd", "lr": 1e-3}},
        {"name": "rest", "label": "rest[anchor-unreliable]", "options": {"anchor_on": "unreliable"}},
        {"name": "rest", "label": "rest[sliding]", "options": {"refresh": "sliding"}},
        {"name": "rest", "label": "rest[refresh-on-shift]", "options": {"refresh": "refresh-on-shift"}}],
        "benchmarks": _ABLATION_BENCHMARKS, "max_queries": 6000},
    # what `qshift demo` runs: a representative subset, about five minutes on two CPU cores
    "demo": {"methods": ["source", "tent", "tcr", "rest"],
             "benchmarks": ["world-c/i2t/gaussian_noise/5", "world-c/i2t/contrast/5", "world-c/i2t/jpeg_compression/5",
                            "world-c/t2i/keyboard/6", "world-diverse/i2t/c8-s5/order0"],
             "max_queries": 512,
             "diagnostics": ["world-c/i2t/gaussian_noise/5"]},
}


def preset(name: str) -> tuple[GridSpec, dict[str, list[str]]]:
    """A named preset as a GridSpec (plus its per-benchmark method restrictions)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    raw = dict(PRESETS[name])
    only = raw.pop("only", {})
    return GridSpec(**raw), only
