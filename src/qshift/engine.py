"""The online loop (docs/method.md §2): stream → score → adapt, one method against one frozen gallery.

Each query is scored exactly once, when its batch arrives (``scoring`` picks which forward's
similarities count).  The run records per-batch diagnostics, online metrics overall and per domain,
forgetting probes for sequential streams, cost, and is saved as one JSON file.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import resource
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import qshift
from qshift.atomic import write_text_atomic
from qshift.data.task import QueryRelevance, task_of
from qshift.methods import create
from qshift.methods.base import method_class, method_options, resolved_options
from qshift.models.protocol import RetrievalModel, default_lr
from qshift.options import Protocol, parse_text
from qshift.parallel import LOCAL, encode_sharded
from qshift.retrieval.index import GalleryIndex
from qshift.retrieval.metrics import (
    candidate_ranks_and_ap,
    per_query_ranks_and_ap,
    summarise,
)

#: how many of each query's best gallery rows a result's per-batch records keep
RECORD_TOP = 10


@dataclass
class RunConfig:
    """One online run: a method with its own options, under a protocol (:class:`qshift.options.Protocol`),
    with one seed for the query order and the method's randomness."""

    method: str = "source"
    protocol: Protocol = field(default_factory=Protocol)
    seed: int = 0
    method_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Fail before any work: an unknown method, a mistyped option or knob names itself."""
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.protocol, Protocol):
            raise TypeError(f"protocol must be a qshift.options.Protocol, got {type(self.protocol).__name__}")
        method_options(self.method, self.method_options)
        method_class(self.method).check_protocol(self.protocol)

    def record(self, model: RetrievalModel) -> dict[str, Any]:
        """What a result file records of its config: the protocol's knobs flat, the learning rate resolved
        for ``model``, and the method's options resolved."""
        return {"method": self.method, **self.protocol.with_lr(default_lr(model)).as_dict(), "seed": self.seed,
                "method_options": dict(self.method_options), "lr_default": default_lr(model),
                "method_resolved": resolved_options(self.method, self.method_options)}


def parse_settings(method: str, settings: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """A :class:`RunConfig` for ``method`` from ``key=value`` strings (the CLI's ``--set``): protocol knobs,
    ``seed``, or the method's own options, each value read as its declared type and validated here, before
    any data is built."""
    cls = method_class(method)
    knobs: dict[str, Any] = {}
    options: dict[str, Any] = {}
    seed = 0
    for item in settings:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set expects key=value, got {item!r}")
        if key == "seed":
            seed = parse_text(text, "int")
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise ValueError(f"seed must be an integer, got {text!r}")
        elif key in Protocol.names():
            knobs[key] = Protocol.parse_value(key, text)
        elif key in cls.Options.names():
            options[key] = cls.Options.parse_value(key, text)
        else:
            raise ValueError(f"unknown setting {key!r} for method {method!r}; protocol knobs: "
                             f"{', '.join(Protocol.names())}, seed; method options: "
                             f"{', '.join(cls.Options.names()) or 'none'}")
    cfg = RunConfig(method, Protocol.build(knobs), seed, options)
    cfg.validate()
    return cfg


@dataclass
class RunResult:
    benchmark: str
    direction: str
    config: dict
    metrics: dict[str, float]
    per_domain: dict[str, dict[str, float]]
    source_clean: dict[str, float] | None
    forgetting: dict[str, Any] | None
    batches: list[dict]
    n_queries: int
    n_gallery: int
    params_adapted: int
    params_total: int
    seconds: float
    peak_rss_mb: float  # the process's peak resident memory so far (a grid's cells share one process)
    environment: dict
    peak_cuda_mb: float | None = None  # this run's peak CUDA allocation; None on CPU
    collapse_resets: int = 0  # how often the collapse guard (reset=on-collapse) sent the method back to source
    model: dict | None = None  # the backbone's identity (spec, weights hash, dataset and annotation hash)
    shift_seed: int | None = None  # the seed of the benchmark's corruptions / perturbations
    max_queries: int | None = None  # the query subsample a run kept (None: every query)
    search: dict | None = None  # the gallery index of a top-K run (candidates > 0); None: whole-gallery scores

    def as_json(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> Path:
        """Write atomically (no half-written result files)."""
        return write_text_atomic(path, json.dumps(self.as_json(), indent=1, default=_jsonable))


def result_filename(result: RunResult) -> str:
    """``<benchmark>__<method>__seed<k>__<hash>.json``: the hash covers the resolved config, the backbone
    and the shift seed, so runs with other options never overwrite each other (an identical rerun does)."""
    key = json.dumps({"config": result.config, "model": result.model, "shift_seed": result.shift_seed,
                      "max_queries": getattr(result, "max_queries", None), "benchmark": result.benchmark}, sort_keys=True, default=_jsonable)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return f"{result.benchmark.replace('/', '__')}__{result.config['method']}__seed{result.config['seed']}__{digest}.json"


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, torch.Tensor):
        return x.tolist()
    return str(x)


def environment(device: torch.device | str | None = None) -> dict:
    """Versions and hardware for a result file; ``device`` adds the device a run used (and the GPU's name)."""
    env = {"qshift": qshift.__version__, "torch": str(torch.__version__), "numpy": np.__version__,
           "python": platform.python_version(), "platform": platform.platform(), "processor": _processor(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), **_library_versions()}
    if device is not None:
        device = torch.device(device)
        env["device"] = str(device)
        if device.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(device)
    return env


#: the distributions whose versions can change a result (backbones, corruptions, perturbations)
RESULT_LIBRARIES = ("torchvision", "open_clip_torch", "transformers", "timm", "imagecorruptions-imaug", "nlpaug",
                    "nltk", "pillow")


def _library_versions() -> dict[str, str]:
    out = {}
    for dist in RESULT_LIBRARIES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _processor() -> str:
    """The CPU's model name (``platform.processor()`` is empty on most Linux systems)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_of(model: RetrievalModel) -> torch.device:
    params = model.adaptable_parameters()
    return params[0][1].device if params else torch.device("cpu")


def _count(model: RetrievalModel) -> tuple[int, int]:
    adapted = sum(p.numel() for _, p in model.adaptable_parameters())
    tower = getattr(model, "query_tower", None)
    total = sum(p.numel() for p in tower().parameters()) if callable(tower) else adapted
    return adapted, total


def _relevant_ids(relevance: QueryRelevance | None, ids: torch.Tensor,
                  gallery_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels, gallery ids) that match exactly where a gallery row is relevant to a query: the query ids
    and ``gallery_ids`` themselves, or with ``relevance.positive`` each query's positive row and row numbers."""
    return (ids, gallery_ids) if relevance is None else relevance.relevant_ids(ids, gallery_ids)


def batch_ranks(method, scores: torch.Tensor, labels: torch.Tensor, gallery_ids: torch.Tensor,
                relevance: QueryRelevance | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per-query ranks, APs and (with ``relevance.subsets``) ranks within the query's group, of scores the
    method just returned (whole-gallery rows, or top-K candidates:
    :func:`qshift.retrieval.metrics.candidate_ranks_and_ap`); ``relevance.exclude`` rows are taken out of
    the ranking first (CIRR's reference image).  ``labels`` are the batch's query ids; with
    ``relevance.positive`` each query's one positive is the gallery row it names
    (:meth:`~qshift.data.task.QueryRelevance.relevant_ids`), whatever ``gallery_ids`` says."""
    cols = method.last_cols
    sub = None
    if relevance is not None:
        ids = labels.cpu().numpy()
        labels, gallery_ids = _relevant_ids(relevance, labels, gallery_ids)
        if relevance.exclude is not None:
            ex = torch.as_tensor(relevance.exclude[ids], device=scores.device).long()
            if cols is None:
                hit = torch.zeros_like(scores, dtype=torch.bool)
                ok = ex >= 0
                hit[torch.arange(len(ex), device=scores.device)[ok], ex[ok]] = True
            else:
                hit = cols == ex[:, None]
            scores = scores.masked_fill(hit, float("-inf"))
        if relevance.subsets is not None:
            rows = torch.as_tensor(relevance.subsets[ids], device=scores.device).long()
            sub = _subset_ranks(scores, cols, rows, labels.to(scores.device), gallery_ids.to(scores.device)).cpu()
    if cols is None:
        r, a = per_query_ranks_and_ap(scores.cpu(), labels, gallery_ids)
        return r, a, sub
    r, a = candidate_ranks_and_ap(scores, cols, labels.to(scores.device), gallery_ids)
    return r.cpu(), a.cpu(), sub


def _subset_ranks(scores: torch.Tensor, cols: torch.Tensor | None, rows: torch.Tensor, labels: torch.Tensor,
                  gallery_ids: torch.Tensor) -> torch.Tensor:
    """Each query's rank of its positive among its group ``rows`` [B, S] (-1 padding), ties against the
    query; in top-K mode a member outside the candidates scores -inf (so the rank is a bound)."""
    valid = rows >= 0
    safe = rows.clamp_min(0)
    if cols is None:
        member = scores.gather(1, safe)
    else:
        match = cols[:, None, :] == safe[:, :, None]
        member = torch.where(match, scores[:, None, :], torch.full_like(scores[:, None, :], float("-inf"))).amax(2)
    member = member.masked_fill(~valid, float("nan"))
    positive = (gallery_ids[safe] == labels[:, None]) & valid
    if not bool(positive.any(1).all()):
        raise ValueError("a query's group does not hold its positive (QueryRelevance.subsets)")
    target = torch.where(positive, member, torch.full_like(member, float("-inf"))).amax(1, keepdim=True)
    above = (member >= target) & valid & ~positive  # NaN padding compares False
    return above.sum(1)


@torch.no_grad()
def _probe(method, queries, gallery_ids, batch_size: int = 256, relevance: QueryRelevance | None = None,
           metrics: tuple[str, ...] = ()) -> dict[str, float]:
    """Metrics of the method's current parameters on ``queries`` without adapting."""
    ids = torch.as_tensor(queries.ids)
    ranks, aps, subs = [], [], []
    for s in range(0, len(queries.items), batch_size):
        scores = method.scores(queries.items[s:s + batch_size])
        r, a, sub = batch_ranks(method, scores, ids[s:s + batch_size], gallery_ids, relevance)
        ranks.append(r)
        aps.append(a)
        subs.append(sub)
    return summarise(torch.cat(ranks), torch.cat(aps), metrics=metrics, subset_ranks=_cat(subs))


def _cat(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if not parts or parts[0] is None else torch.cat(parts)


def run_online(model: RetrievalModel, task, cfg: RunConfig, progress: bool = True,
               gallery_embeddings: torch.Tensor | None = None, gallery_index: GalleryIndex | None = None,
               comm=None, keep_adapted: bool = False) -> RunResult:
    """Run ``cfg.method`` over ``task``'s stream (a registry task) and return the result.

    ``gallery_embeddings`` may pass the task's gallery already encoded by ``model`` (a grid reuses
    them across methods: the gallery tower is frozen, so they are the same for every cell), and
    ``gallery_index`` an index over them for a top-K run (``candidates`` > 0; built from the protocol's
    ``index`` otherwise).  ``comm`` splits each batch over processes (:mod:`qshift.parallel`).  The model's
    adaptable parameters are put back as they came when the run ends (or fails), so runs on one model
    object never start from another run's adapted weights; ``keep_adapted=True`` leaves a finished run's
    adapted parameters in the model (to probe it after the stream).
    """
    cfg.validate()
    torch.manual_seed(cfg.seed)
    device = _device_of(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    gallery_ids = torch.as_tensor(task.gallery_ids)
    if gallery_embeddings is not None:
        if gallery_embeddings.shape[0] != len(gallery_ids):
            raise ValueError(f"{gallery_embeddings.shape[0]} gallery embeddings for {len(gallery_ids)} gallery items")
        gallery = gallery_embeddings.detach()
    else:
        # several processes: each encodes its share of the gallery, all get the whole of it
        gallery = encode_sharded(model.encode_gallery, task.gallery, comm or LOCAL, 256)
    relevance = getattr(task, "relevance", None)
    # the method sees relevance as the metrics read it (the oracle's labels, a method's gallery groups):
    # with ``relevance.positive``, the gallery's row numbers and each query's positive row
    _, method_gallery_ids = _relevant_ids(relevance, torch.zeros(0, dtype=torch.int64), gallery_ids)
    method = create(cfg.method, model, gallery, protocol=cfg.protocol,
                    gallery_ids=method_gallery_ids.to(gallery.device),
                    gallery_index=gallery_index, comm=comm, **cfg.method_options)
    try:
        stream = task.stream(batch_size=cfg.protocol.batch_size, seed=cfg.seed)
        sequential = stream.kind == "sequential"
        clean = getattr(task, "clean_queries", None)
        names = task_of(task.direction).metrics
        probe = partial(_probe, gallery_ids=gallery_ids, relevance=relevance, metrics=names)
        source_clean = probe(method, clean) if (clean is not None and sequential) else None
        first_domain_set = task.query_sets[int(stream.order[0, 0])]
        source_first = probe(method, first_domain_set) if sequential else None
        ranks, aps, subs, domains, batches = [], [], [], [], []
        forgetting_curve = []
        prev_domain = None
        for batch in tqdm(stream, total=len(stream), desc=f"{cfg.method} on {task.name}", disable=not progress):
            dom = batch.domains[0]
            if sequential and prev_domain is not None and dom != prev_domain:
                if source_clean is not None:
                    forgetting_curve.append({"after": prev_domain, **_delta(probe(method, clean), source_clean)})
                if cfg.protocol.reset == "reset_each_domain":
                    method.reset()
            if cfg.protocol.reset == "episodic":
                method.reset()
            prev_domain = dom
            labels = torch.as_tensor(batch.ids)
            known = _relevant_ids(relevance, labels, gallery_ids)[0].to(gallery.device) if method.uses_labels else None
            scores, rec = method.adapt_batch(batch.items, labels=known)
            r, a, sub = batch_ranks(method, scores, labels, gallery_ids, relevance)
            subs.append(sub)
            rec["ranks"] = r.tolist()  # each query's first-positive rank, and its best gallery rows: never score rows
            rec["top"] = method.top(scores, RECORD_TOP)[0].cpu().tolist()
            ranks.append(r)
            aps.append(a)
            domains.extend(batch.domains)
            rec["batch"] = batch.index
            rec["domain"] = dom
            rec["size"] = len(batch)
            rec["R@1"] = 100.0 * float((r < 1).double().mean())
            batches.append(rec)
        ranks_t, aps_t, subs_t = torch.cat(ranks), torch.cat(aps), _cat(subs)
        metrics = summarise(ranks_t, aps_t, metrics=names, subset_ranks=subs_t)
        dom_arr = np.asarray(domains)
        per_domain = {}
        for d in dict.fromkeys(domains):
            sel = torch.as_tensor(dom_arr == d)
            per_domain[d] = summarise(ranks_t[sel], aps_t[sel], metrics=names,
                                      subset_ranks=None if subs_t is None else subs_t[sel])
        forgetting = None
        if source_clean is not None:
            after = probe(method, clean)
            forgetting_curve.append({"after": prev_domain, **_delta(after, source_clean)})
            first_after = probe(method, first_domain_set)
            forgetting = {"clean_after": after, "clean_source": source_clean, "clean_delta_R@1": after["R@1"] - source_clean["R@1"],
                          "first_domain": first_domain_set.domain, "first_domain_after": first_after,
                          "first_domain_source": source_first,
                          "first_domain_delta_R@1": first_after["R@1"] - source_first["R@1"],
                          "first_domain_online": per_domain[first_domain_set.domain], "curve": forgetting_curve}
    except BaseException:
        method.reset()
        raise
    if not keep_adapted:
        method.reset()  # the model leaves the run with the parameters it came with
    adapted, total = _count(model)
    resets = sum(1 for b in batches if b.get("collapse_reset"))
    return RunResult(
        benchmark=task.name, direction=task.direction,
        config=cfg.record(model),
        metrics=metrics, per_domain=per_domain,
        source_clean=source_clean, forgetting=forgetting, batches=batches,
        n_queries=int(ranks_t.numel()), n_gallery=int(len(gallery_ids)),
        params_adapted=adapted if method.adapts else 0, params_total=total,
        seconds=time.perf_counter() - t0,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        environment={**environment(device), "world_size": (comm or LOCAL).world_size},
        peak_cuda_mb=torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        collapse_resets=resets, search=None if method.index is None else
        {**method.index.describe(), "candidates": method.candidates})


def _delta(now: dict[str, float], ref: dict[str, float]) -> dict[str, float]:
    return {"R@1": now["R@1"], "delta_R@1": now["R@1"] - ref["R@1"]}
