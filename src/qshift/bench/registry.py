"""The benchmark-family registry: the only code that parses a benchmark name.

A family is one registration (:func:`register_family`, in src/qshift/bench/families.py, or
src/qshift/bench/cir_families.py for composed retrieval): a name
pattern with ``{placeholders}`` and each placeholder's allowed values, its builder, the direction its
benchmarks belong to, and how reports show it — a table title and a column per benchmark, the summary
column its mean goes to, or none of those for a stream family (diverse shift, reported per domain order).
``qshift shifts list``, the grid expander, the report's tables and the real-dataset families all read it.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from qshift.data.task import RetrievalTask


@dataclass(frozen=True)
class BuildContext:
    """What a builder may use besides the name's parameters."""

    shift_seed: int = 0
    split: str = "test"
    workers: int | None = None
    progress: bool = False
    max_queries: int | None = None
    dataset: Any = None  # a loaded real dataset (data.karpathy.ImageTextDataset) for real-data families


@dataclass(frozen=True)
class Family:
    """One benchmark family; ``pattern`` is ``"world-c/i2t/{corruption}/{severity}"``-like, ``params``
    maps each placeholder to its allowed values (a callable for values known only at run time, e.g. the
    registered corruptions), ``direction`` is a direction name or the placeholder that holds it."""

    name: str
    pattern: str
    params: dict[str, Callable[[], Sequence[Any]]]
    build: Callable[[BuildContext, dict[str, Any]], RetrievalTask]
    direction: str
    title: str | None = None  # report table title (``str.format`` with the parameters); None: a stream family
    column: str | None = None  # the table column of one benchmark
    summary: str | None = None  # the summary-table column this family's mean goes to
    summary_rank: Callable[[dict[str, Any]], tuple] = field(default=lambda p: ())
    needs_dataset: bool = False  # a real-data family: its builder reads ``BuildContext.dataset``
    listed: bool = True  # enumerate its names in ``list_benchmarks``
    splits: tuple[str, ...] = ("test", "val", "test1k")  # world splits its builder accepts
    list_params: dict[str, Callable[[], Sequence[Any]]] = field(default_factory=dict)  # listed, if not all
    stream: str | None = None  # a stream family's short name in its report table ("i2t/mix8")

    def regex(self) -> re.Pattern:
        out, pos = "", 0
        for m in re.finditer(r"\{(\w+)\}", self.pattern):
            out += re.escape(self.pattern[pos:m.start()]) + f"(?P<{m.group(1)}>[^/]+?)"
            pos = m.end()
        return re.compile(out + re.escape(self.pattern[pos:]) + r"\Z")

    def parse(self, name: str) -> dict[str, Any] | None:
        """The parameters of ``name`` if it belongs to this family (values typed as the allowed ones)."""
        m = self.regex().match(name)
        if m is None:
            return None
        out = {}
        for key, text in m.groupdict().items():
            allowed = self.params[key]()
            if hasattr(allowed, "match"):  # an open set of values (any domain order k)
                value = allowed.match(text)
            else:
                value = next((a for a in allowed if str(a) == text), None)
            if value is None:
                return None
            out[key] = value
        return out

    def names(self) -> list[str]:
        """Every listed benchmark name of the family, in the order of its parameters' values."""
        names = [self.pattern]
        for key, values in self.params.items():
            values = self.list_params.get(key, values)
            names = [n.replace("{" + key + "}", str(v)) for n in names for v in values()]
        return names

    def direction_of(self, params: dict[str, Any]) -> str:
        return params.get(self.direction, self.direction)

    def describe(self, params: dict[str, Any]) -> dict[str, Any]:
        """How a report shows one benchmark: its table title and column, its summary column and rank."""
        p = {**params, "direction": self.direction_of(params)}
        if self.title is None:
            return {"family": self.name, "title": None, "stream": self.stream, **p}
        return {"family": self.name, "title": self.title.format(**p), "column": self.column.format(**p),
                "summary": self.summary.format(**p) if self.summary else None,
                "summary_rank": (FAMILY_ORDER.index(self.name), *self.summary_rank(p)), **p}


_FAMILIES: dict[str, Family] = {}
FAMILY_ORDER: list[str] = []  # registration order: the summary table's column order


def register_family(family: Family) -> Family:
    """Add ``family`` to the registry (a name may be registered once)."""
    if family.name in _FAMILIES:
        raise ValueError(f"benchmark family {family.name!r} registered twice")
    _FAMILIES[family.name] = family
    FAMILY_ORDER.append(family.name)
    return family


def families() -> list[Family]:
    """Every registered family, in registration order."""
    _load()
    return [_FAMILIES[n] for n in FAMILY_ORDER]


def _load() -> None:
    from qshift.bench import families as _  # noqa: F401  (registers the built-in families; imports this module)
    from qshift.bench import cir_families as _cir  # noqa: F401  (the composed-retrieval families)
    from qshift.bench import cir_real_families as _cir_real  # noqa: F401  (FashionIQ-C, CIRR-C)
    from qshift.bench import av_families as _av  # noqa: F401  (the embedded video-audio families)
    from qshift.bench import av_real_families as _av_real  # noqa: F401  (VGGSound-C, KS50-C)


def resolve(name: str, dataset_name: str | None = None) -> tuple[Family, dict[str, Any]]:
    """The family of benchmark ``name`` and its parameters; ``ValueError`` with suggestions otherwise."""
    name = name.strip().strip("/")
    for fam in families():
        params = fam.parse(name)
        if params is not None:
            return fam, params
    raise _unknown(name, dataset_name)


def describe(name: str) -> dict[str, Any]:
    """How reports show benchmark ``name`` (see :meth:`Family.describe`); a name no family knows gets
    ``{"title": None}`` (reported with the streams)."""
    try:
        fam, params = resolve(name)
    except ValueError:
        return {"family": None, "title": None}
    return fam.describe(params)


def list_benchmarks(dataset: str | None = None) -> list[str]:
    """Every canonical benchmark name: the embedded world's, or ``dataset``'s real-data ones."""
    out = []
    for fam in families():
        if dataset is None and fam.listed and not fam.needs_dataset:
            out += fam.names()
        elif dataset is not None and fam.needs_dataset:
            out += [n for n in fam.names() if fam.parse(n).get("dataset") == dataset]
    return out


def build_benchmark(name: str, shift_seed: int = 0, workers: int | None = None, progress: bool = False,
                    split: str = "test", max_queries: int | None = None, dataset: Any = None) -> RetrievalTask:
    """Resolve a benchmark name into its task.

    ``split`` builds a world benchmark on another world split (``val``: for calibrating a setting away
    from the reported test images; ``test1k``) where its family allows it; ``max_queries`` keeps at most
    that many queries, evenly over the task's query sets; ``dataset`` is the loaded real dataset a
    real-data family (``coco-c/i2t/fog/5``) reads."""
    fam, params = resolve(name, getattr(dataset, "name", None))
    if fam.needs_dataset:
        if dataset is None:
            raise ValueError(f"{name}: a real-data benchmark needs its dataset (--dataset and --data-root)")
        if params.get("dataset") != dataset.name:
            raise ValueError(f"{name}: this benchmark belongs to dataset {params.get('dataset')!r}, "
                             f"but the loaded dataset is {dataset.name!r}")
    elif split not in fam.splits:
        raise ValueError(f"{name}: the {fam.name} benchmarks are built on their own split; split={split!r} is "
                         "not allowed")
    ctx = BuildContext(shift_seed=shift_seed, split=split, workers=workers, progress=progress,
                       max_queries=max_queries, dataset=dataset)
    task = fam.build(ctx, params)
    task.name = name
    if max_queries is not None:
        task = task.subsample(max_queries, seed=0)
    return task


def _unknown(name: str, dataset_name: str | None = None) -> ValueError:
    known = list_benchmarks(dataset_name) if dataset_name else list_benchmarks()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown benchmark {name!r}{hint} (`qshift shifts list` prints every name)")
