"""``qshift shifts …``: list, preview and materialise the query shifts and benchmarks."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from qshift.cli.common import (app, console, error as _error)


shifts_app = typer.Typer(no_args_is_help=True, help="List and preview the query shifts and benchmarks.")
app.add_typer(shifts_app, name="shifts")


@shifts_app.command("list")
def shifts_list(
    pattern: Annotated[Optional[str], typer.Argument(help="Only names containing this text.")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="A real dataset's benchmarks instead of the world's "
                                                        "(coco, flickr, cuhk-pedes, …).")] = None,
    families: Annotated[bool, typer.Option("--families", help="One line per benchmark family: its pattern, "
                                                              "direction and report table.")] = False,
) -> None:
    """Print every registered benchmark name, one per line (or the families)."""
    from qshift.bench import registry
    from qshift.data.av_datasets import AV_DATASETS
    from qshift.data.cir_datasets import CIR_DATASETS
    from qshift.data.retrieval_datasets import DATASET_NAMES as IMAGE_TEXT_DATASETS

    DATASET_NAMES = IMAGE_TEXT_DATASETS + CIR_DATASETS + AV_DATASETS

    if families:
        for fam in registry.families():
            kind = "stream" if fam.title is None else f"table {fam.title!r}"
            typer.echo(f"{fam.pattern}\t{fam.direction}\t{kind}" + ("\t(real dataset)" if fam.needs_dataset else ""))
        return
    if dataset is not None and dataset not in DATASET_NAMES:
        _error(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASET_NAMES)}")
        raise typer.Exit(2)
    for name in registry.list_benchmarks(dataset):
        if pattern is None or pattern in name:
            typer.echo(name)
    if dataset is None:  # on stderr: stdout stays one name a line
        typer.echo(f"# the embedded world's benchmarks; real datasets ({', '.join(DATASET_NAMES)}) have their own, "
                   "listed by `qshift shifts list --dataset NAME` and run with --dataset NAME --data-root DIR:", err=True)
        for fam in registry.families():
            if fam.needs_dataset:
                typer.echo(f"#   {fam.pattern}", err=True)


@shifts_app.command("materialize")
def shifts_materialize(
    dataset: Annotated[str, typer.Option(help="coco, flickr, cuhk-pedes, icfg-pedes, nocaps[-in|-near|-out]; "
                                              "fashioniq, cirr (composed retrieval).")],
    data_root: Annotated[Path, typer.Option(help="Folder with the clean images and the annotation file.")],
    out: Annotated[Path, typer.Option(help="Where to write the copies (see --layout).")],
    corruption: Annotated[Optional[list[str]], typer.Option(help="Image corruption(s) (repeatable; default: the 16, "
                                                                  "unless only --perturbation is given).")] = None,
    severity: Annotated[Optional[list[int]], typer.Option(min=1, max=5, help="Severity (repeatable; default 1–5).")]
    = None,
    perturbation: Annotated[Optional[list[str]], typer.Option(
        help="Text perturbation(s) whose annotation files to write, or 'all' (repeatable; COCO / Flickr; "
             "synonym_replace and word_insert need WordNet: pip install 'qshift[wordnet]').")] = None,
    level: Annotated[Optional[list[int]], typer.Option(min=1, max=7, help="Text level (repeatable; default 1–7).")]
    = None,
    annotation: Annotated[Optional[Path], typer.Option(help="Annotation file (default: the usual name).")] = None,
    seed: Annotated[int, typer.Option(help="Shift seed (the same pixels and captions as the on-the-fly benchmark).")]
    = 0,
    layout: Annotated[str, typer.Option(help="qshift: <out>/<corruption>/<severity>/ with the annotation (a drop-in "
                                             "--data-root) and <out>/<perturbation>/<level>/<annotation> (a drop-in "
                                             "--annotation); tcr: TCR's <out>/coco-IP/COCO_IP_<c>_<s>/ image roots and "
                                             "<out>/coco-TP/annotation_<name>/<level>/ annotation folders.")]
    = "qshift",
    split: Annotated[Optional[str], typer.Option(help="fashioniq / cirr: the split (default val; train, val, "
                                                      "test for FashionIQ, test1 for CIRR).")] = None,
    category: Annotated[Optional[list[str]], typer.Option(help="fashioniq: the categories (repeatable; default "
                                                               "every one present: dress, shirt, toptee).")] = None,
) -> None:
    """Write corrupted copies of a real dataset's images and perturbed copies of its captions to disk.

    FashionIQ / CIRR: the *reference* images corrupted, under <out>/<corruption>/<severity>/, and the relative
    captions perturbed, under <out>/text/<perturbation>/<level>/: each a drop-in --data-root (the gallery is
    read from the clean root it names)."""
    from qshift.data.cir_datasets import CIR_DATASETS

    if dataset in CIR_DATASETS:
        _materialize_cir(dataset, data_root, out, corruption, severity, perturbation, level, annotation, seed,
                         layout, split, category)
        return
    from qshift.data.av_datasets import AV_DATASETS

    if dataset in AV_DATASETS:
        _error(f"{dataset}: the video-audio benchmarks corrupt clips and soundtracks on the fly, or read READ's "
               "pre-corrupted -C folders as they are (see docs/video-audio-real.md); there is nothing to materialize")
        raise typer.Exit(2)
    if split is not None or category:
        _error("--split and --category are for fashioniq / cirr")
        raise typer.Exit(2)
    from qshift.data import retrieval_datasets as RD
    from qshift.data.karpathy import DATASETS, materialize
    from qshift.shifts.image import CORRUPTIONS, available_corruptions
    from qshift.shifts.text import LEVELS, TCR_TP_ROOTS, TEXT_PERTURBATIONS, materialize_text

    perts = list(TEXT_PERTURBATIONS) if perturbation and "all" in perturbation else list(perturbation or [])
    corrs = corruption or ([] if perts else list(CORRUPTIONS))
    n = 0
    texts: list[Path] = []
    try:
        bad = [c for c in corrs if c not in available_corruptions()]
        if bad:
            raise ValueError(f"unknown corruption(s) {bad}; see `qshift shifts list`")
        ds = RD.load_dataset(dataset, data_root, annotation)
        if perts:  # first: fast, and it finds WordNet before anything long runs
            texts = materialize_text(ds, data_root, out, perts, level or list(LEVELS),
                                     DATASETS.get(ds.name, "annotation.json"), seed, layout)
        if corrs:
            default = DATASETS.get(dataset) or RD.PEDES.get(dataset) or RD.NOCAPS_FILE
            ann = annotation or getattr(ds, "annotation", None) or data_root / default
            n = materialize(ds, data_root, ann, out, corrs, severity or [1, 2, 3, 4, 5], seed, layout=layout)
    except (ValueError, FileNotFoundError) as e:
        _error(e)
        raise typer.Exit(2)
    if corrs:
        where = "<corruption>/<severity>/ (each a drop-in --data-root)" if layout == "qshift" \
            else "TCR's *-IP/ image roots"
        console.print(f"wrote {n} images under {out}/{where}")
    if texts:
        where = "<perturbation>/<level>/ (each a drop-in --annotation)" if layout == "qshift" \
            else f"{TCR_TP_ROOTS[ds.name]}/annotation_<name>/<level>/ (each a TCR ann_root)"
        console.print(f"wrote {len(texts)} annotation files under {out}/{where}")


def _materialize_cir(dataset: str, data_root: Path, out: Path, corruption, severity, perturbation, level,
                     annotation: Optional[Path], seed: int, layout: str, split: Optional[str],
                     category: Optional[list[str]]) -> None:
    """``qshift shifts materialize`` for FashionIQ / CIRR (:func:`qshift.data.cir_datasets.materialize_cir`)."""
    from qshift.data import cir_datasets as C
    from qshift.shifts.image import CORRUPTIONS, SEVERITIES
    from qshift.bench.cir_families import CIR_TEXT_PERTURBATIONS
    from qshift.shifts.text import LEVELS

    perts = list(CIR_TEXT_PERTURBATIONS) if perturbation and "all" in perturbation else list(perturbation or [])
    corrs = list(corruption or ([] if perts else CORRUPTIONS))
    try:
        if layout != "qshift":
            raise ValueError(f"--layout {layout}: {dataset} is written in qshift's layout only (drop-in data roots)")
        if category and dataset != "fashioniq":
            raise ValueError("--category is for fashioniq")
        split = split or "val"
        if dataset == "fashioniq":
            if annotation is not None:
                raise ValueError("fashioniq takes no --annotation (it reads captions/cap.<category>.<split>.json)")
            ds = C.load_fashioniq(data_root, split, tuple(category) if category else None)
        else:
            ds = C.load_cirr(data_root, split, annotation)
        n, roots = C.materialize_cir(ds, out, corrs, severity or list(SEVERITIES), perts, level or list(LEVELS),
                                     seed)
    except (ValueError, FileNotFoundError, OSError) as e:
        _error(e)
        raise typer.Exit(2)
    if corrs:
        console.print(f"wrote {n} reference images under {out}/<corruption>/<severity>/ (each a drop-in --data-root)")
    if perts:
        console.print(f"wrote {len(perts) * len(level or LEVELS)} caption sets under {out}/text/<perturbation>/<level>/ "
                      "(each a drop-in --data-root)")


@shifts_app.command("preview")
def shifts_preview(
    out: Annotated[Path, typer.Option(help="PNG to write: every corruption × severity, and the domains.")]
    = Path("shifts_preview.png"),
    image_index: Annotated[int, typer.Option(min=0, help="Which test image to corrupt.")] = 0,
    seed: Annotated[int, typer.Option(help="Shift seed.")] = 0,
) -> None:
    """Draw every image corruption at every severity (and the QGS domains); print text examples."""
    from qshift.bench.preview import draw_image_preview, text_examples

    path = draw_image_preview(out, image_index=image_index, seed=seed)
    console.print(f"wrote {path}")
    for line in text_examples(image_index=image_index, seed=seed):
        console.print(line, markup=False, highlight=False)
