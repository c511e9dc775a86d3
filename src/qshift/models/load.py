"""Model specs (the CLI's ``--model``) to a :class:`~qshift.models.protocol.RetrievalModel`.

Every mistake in a spec, its weights, its options or the device is a one-line
:class:`~qshift.errors.UserError` naming the flag or file and the fix; the backbone loaders check their
own files (see :mod:`qshift.models.openclip_model` and :mod:`qshift.models.hf_models`)."""
from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qshift.data.task import DIRECTIONS, TASKS, check_served, directions_of
from qshift.errors import UserError
from qshift.models.dual_tower import resolve_device
from qshift.models.preprocess import PREPROCESS_MODES
from qshift.models.world_model import WorldRetrievalModel, load_world_model
from qshift.models.protocol import RetrievalModel, check_retrieval_model, one_line

MODEL_SPECS = ("world", "openclip:ARCH", "hf-clip:PATH", "hf-blip:PATH", "cavmae:PATH", "custom:module:factory")
#: the tasks each kind of backbone serves (a custom factory builds whatever its direction's modalities are)
SERVED_TASKS: dict[str, tuple[str, ...]] = {"world": ("image-text", "composed", "video-audio"),
                                            "openclip": ("image-text", "composed"),
                                            "hf-clip": ("image-text", "composed"), "hf-blip": ("image-text",),
                                            "cavmae": ("video-audio",),
                                            "custom": tuple(TASKS)}
#: the directions the built-in backbones serve (what ``--direction`` offers)
BUILTIN_DIRECTIONS: tuple[str, ...] = tuple(dict.fromkeys(d for kind, tasks in SERVED_TASKS.items() if kind != "custom"
                                                           for t in tasks for d in directions_of(t)))


def load_model(name: str = "world", direction: str = "i2t", weights: str | Path | None = None, *,
               preprocess: str = "model", device: str = "cpu", **options: Any) -> RetrievalModel:
    """A RetrievalModel from a spec (the CLI's ``--model``):

    - ``world``: the shipped embedded model (``weights``: another file); for ``v2a`` / ``a2v``, the shipped AV
      model (:mod:`qshift.models.av_model`; ``weights``: a ``qshift train-av-model`` checkpoint); for the composed task's ``cir``, the
      shipped CIR model (``weights``: a ``qshift train-cir-model`` checkpoint; options ``fusion`` =
      ``combiner`` / ``sum`` / ``interp`` and ``alpha``, see :func:`qshift.models.cir_model.load_cir_model`);
    - ``openclip:ARCH``: open_clip architecture ARCH (a name or a model-config JSON); ``weights`` is required:
      a checkpoint path, a pretrained tag already in the local cache, or ``"random"`` (untrained, on purpose);
    - ``hf-clip:PATH`` / ``hf-blip:PATH``: a ``transformers`` CLIP / BLIP retrieval model saved in PATH with its
      tokenizer (the weights are PATH's: ``weights`` must be None);
    - for ``cir``, ``openclip:ARCH`` / ``hf-clip:PATH`` build a composed model over those towers
      (:func:`qshift.models.cir_real.load_real_cir_model`: option ``combiner`` = a CLIP4Cir combiner checkpoint,
      or ``fusion`` = ``sum`` / ``interp`` with ``alpha``);
    - ``cavmae:PATH``: a CAV-MAE / READ checkpoint (``v2a`` / ``a2v``; options ``num_heads``, ``audio_mean``,
      ``audio_std``, ``frame_pool``, ``autocast``: see :func:`qshift.models.cavmae.load_cavmae`);
    - ``custom:module:factory``: ``module.factory(direction=..., weights=..., **options)`` returns one (it also
      gets ``device=`` if it takes that argument); see docs/backbones.md for the contract.

    ``direction`` is ``"i2t"`` (image queries, text gallery) or ``"t2i"`` for the built-in backbones (the
    image-text task); a custom factory may also take the other tasks' directions (``v2a``, ``a2v``, ``cir``:
    see :mod:`qshift.data.task`); ``preprocess`` is the
    model's own transform (``model``) or TCR's (``tcr``); ``device`` must exist here (``cpu``, ``cuda``,
    ``cuda:N``); ``options`` go to the backbone loader (``quick_gelu``, ``autocast``, ``grad_checkpointing``, …).
    Raises :class:`~qshift.errors.UserError` for any bad spec, file, option or device.
    """
    if direction not in DIRECTIONS:
        raise UserError(f"--direction must be one of {', '.join(BUILTIN_DIRECTIONS)}, got {direction!r}")
    if preprocess not in PREPROCESS_MODES:
        raise UserError(f"--preprocess must be one of {', '.join(PREPROCESS_MODES)}, got {preprocess!r}")
    dev = resolve_device(device)
    modality = DIRECTIONS[direction].query
    kind, _, rest = name.partition(":")
    if kind in SERVED_TASKS:
        _check_served(name, kind, direction)
    if kind == "world" and not rest:
        if DIRECTIONS[direction].task == "video-audio":  # the AV world's model (qshift.models.av_model)
            from qshift.models.av_model import load_av_model

            _no_options(name, options, ())
            return load_av_model(weights, direction, device=dev)
        if DIRECTIONS[direction].task == "composed":  # the world's CIR model: its towers and combiner
            from qshift.models.cir_model import FUSIONS, load_cir_model

            _no_options(name, {k: v for k, v in options.items() if k not in ("fusion", "alpha")}, ())
            fusion = options.get("fusion", "combiner")
            if fusion not in FUSIONS:
                raise UserError(f"--model world: unknown fusion {fusion!r}; known: {', '.join(FUSIONS)}")
            try:
                return load_cir_model(weights, fusion=fusion, alpha=float(options.get("alpha", 0.5)), device=dev)
            except FileNotFoundError as e:
                raise UserError(str(e)) from e
        _no_options(name, options, ())
        try:
            encoder = load_world_model(weights)
        except FileNotFoundError as e:
            raise UserError(str(e)) from e
        return WorldRetrievalModel(encoder.to(dev), modality)
    if kind in ("openclip", "hf-clip") and rest and DIRECTIONS[direction].task == "composed":
        from qshift.models.cir_real import load_real_cir_model  # optional dependency (qshift[backbones])

        # a CLIP4Cir combiner checkpoint (``combiner=``) or a training-free fusion (``fusion=sum|interp``)
        return load_real_cir_model(name, weights, device=str(dev), preprocess=preprocess, **options)
    if kind == "openclip" and rest:
        from qshift.models.openclip_model import load_openclip  # optional dependency (qshift[backbones])

        _no_options(name, options, _keyword_options(load_openclip))
        return load_openclip(rest, None if weights is None else str(weights), modality, preprocess=preprocess,
                             device=str(dev), **options)
    if kind in ("hf-clip", "hf-blip") and rest:
        from qshift.models.hf_models import load_hf_blip, load_hf_clip  # optional dependency (qshift[backbones])

        if weights is not None:
            raise UserError(f"--model {name} reads its weights from the folder {rest}; drop --weights {weights}")
        loader = load_hf_clip if kind == "hf-clip" else load_hf_blip
        _no_options(name, options, _keyword_options(loader))
        return loader(rest, modality, preprocess=preprocess, device=str(dev), **options)
    if kind == "cavmae" and rest:
        from qshift.models.cavmae import load_cavmae

        if weights is not None:
            raise UserError(f"--model {name} reads its weights from {rest}; drop --weights {weights}")
        _no_options(name, options, _keyword_options(load_cavmae))
        return load_cavmae(rest, direction, preprocess=preprocess, device=str(dev), **options)
    if kind == "custom" and rest.count(":") == 1 and all(rest.split(":")):
        module, factory = rest.split(":")
        return load_custom(module, factory, direction, weights, device=str(dev), **options)
    raise UserError(f"unknown model spec {name!r}; expected one of {', '.join(MODEL_SPECS)}")


def load_custom(module: str, factory: str, direction: str, weights: str | Path | None = None, *,
                device: str = "cpu", **options: Any) -> RetrievalModel:
    """``module.factory(direction=..., weights=..., **options)`` (plus ``device=`` when the factory takes it),
    checked to return a RetrievalModel that queries with ``direction``'s modality."""
    spec = f"custom:{module}:{factory}"
    _check_served(spec, "custom", direction)
    importlib.invalidate_caches()  # a module written since the interpreter started (a notebook, a test) is found
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        if isinstance(e, ModuleNotFoundError) and e.name and module.split(".")[0] == e.name.split(".")[0]:
            raise UserError(f"{spec}: no module named {module!r} on the Python path; run from the folder holding "
                            f"{module.split('.')[0]}.py or add that folder to PYTHONPATH") from e
        raise UserError(f"{spec}: importing {module!r} failed: {one_line(e)}") from e
    fn = getattr(mod, factory, None)
    if not callable(fn):
        what = "has no attribute" if fn is None else "has a non-callable"
        raise UserError(f"{spec}: module {module!r} {what} {factory!r} (expected a factory "
                        "build(direction, weights, **options) returning a RetrievalModel)")
    kwargs: dict[str, Any] = {"direction": direction, "weights": None if weights is None else str(weights), **options}
    takes = _parameters(fn)
    if takes is None or "device" in takes or any(p.kind is p.VAR_KEYWORD for p in takes.values()):
        kwargs["device"] = device
    elif device != "cpu":
        raise UserError(f"{spec}: --device {device} was asked for, but {factory}() takes no device argument; "
                        "add one (def build(direction, weights=None, device='cpu', **options))")
    if takes is not None:
        try:
            inspect.signature(fn).bind(**kwargs)
        except TypeError as e:
            raise UserError(f"{spec}: {factory}() cannot be called with {', '.join(kwargs)} ({e}); a factory takes "
                            "(direction, weights, **options)") from e
    try:
        model = fn(**kwargs)
    except UserError:
        raise
    except Exception as e:  # the user's factory: whatever it raises is reported as its failure, in one line
        raise UserError(f"{spec}: the factory raised {type(e).__name__}: {one_line(e)}") from e
    return check_retrieval_model(model, spec, DIRECTIONS[direction].query)


def _check_served(name: str, kind: str, direction: str) -> None:
    """A one-line UserError when backbone ``kind`` does not serve ``direction``'s task."""
    try:
        check_served(direction, SERVED_TASKS[kind], f"backbone {name}")
    except ValueError as e:
        raise UserError(str(e)) from e


def _parameters(fn: Callable) -> dict[str, inspect.Parameter] | None:
    """``fn``'s parameters, or None when Python cannot tell (some builtins / C extensions)."""
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def _keyword_options(loader: Callable) -> tuple[str, ...]:
    """The keyword-only options a backbone loader takes besides preprocess and device."""
    return tuple(n for n, p in inspect.signature(loader).parameters.items()
                 if p.kind is p.KEYWORD_ONLY and n not in ("preprocess", "device"))


def _no_options(name: str, options: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        accepted = f"it takes {', '.join(allowed)}" if allowed else "it takes none"
        raise UserError(f"--model {name}: unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                        f"({accepted})")
