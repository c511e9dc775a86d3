"""``qshift serve``: one model, one gallery and one method behind an HTTP API (docs/serve.md)."""
from __future__ import annotations

import logging
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from qshift.cli.common import (USER_ERRORS, AnnotationOpt, DataRootOpt, DatasetOpt, DeviceOpt, ModelOpt, PreprocessOpt,
                               Split, WeightsOpt, app, error as _error)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class ServeDirection(str, Enum):
    i2t = "i2t"
    t2i = "t2i"


@app.command("serve")
def serve_cmd(
    method: Annotated[str, typer.Option(help="Method name (rest, tcr, tent, source, …).")] = "rest",
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="A protocol knob or method option, key=value (repeatable), as for `qshift run`; batch_size is "
                      "the adaptation batch B. The collapse guard is on unless reset= is set "
                      "(reset=never turns it off).")] = None,
    model: ModelOpt = "world",
    weights: WeightsOpt = None,
    direction: Annotated[ServeDirection, typer.Option(help="i2t: image queries, text gallery; t2i: the reverse.")]
        = ServeDirection.i2t,
    split: Annotated[Split, typer.Option(help="World model: the split whose captions (i2t) or images (t2i) are the "
                                              "gallery.")] = Split.test1k,
    dataset: DatasetOpt = None,
    data_root: DataRootOpt = None,
    annotation: AnnotationOpt = None,
    gallery_embeddings: Annotated[Optional[Path], typer.Option(
        help="A precomputed gallery: a .npy [N, d] array of L2-normalised embeddings from this model's gallery "
             "tower.")] = None,
    gallery_ids: Annotated[Optional[Path], typer.Option(
        help="With --gallery-embeddings: a text file of the gallery's ids, one per line (default: row numbers).")]
        = None,
    host: Annotated[str, typer.Option(help="Address to bind (another than loopback exposes the server).")]
        = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to bind.")] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        envvar="QSHIFT_API_KEY", show_default=False,
        help="Token that reset / checkpoint / shutdown require (Authorization: Bearer …).")] = None,
    state_dir: Annotated[Optional[Path], typer.Option(
        help="Folder for checkpoints; a restarted server resumes from the one there.")] = None,
    checkpoint_every: Annotated[int, typer.Option(min=0, help="Checkpoint every N batches (0: only on shutdown and "
                                                              "on request).")] = 50,
    fresh: Annotated[bool, typer.Option(help="Start from the source weights even if --state-dir holds a checkpoint "
                                             "(the next checkpoint replaces it).")] = False,
    max_wait_ms: Annotated[float, typer.Option(min=0, help="Longest a query waits for its batch to fill.")] = 20.0,
    max_queue: Annotated[int, typer.Option(min=1, help="Queries that may wait; more are answered 429.")] = 1024,
    max_request_queries: Annotated[int, typer.Option(min=1, help="Queries per request.")] = 256,
    max_k: Annotated[int, typer.Option(min=1, help="Largest k a request may ask for.")] = 100,
    image_root: Annotated[Optional[Path], typer.Option(
        help="Folder that path queries may read from (without it, path queries are refused).")] = None,
    request_timeout: Annotated[float, typer.Option(min=0.1, help="Seconds before an unanswered request gets 503.")]
        = 120.0,
    device: DeviceOpt = "cpu",
    preprocess: PreprocessOpt = "model",
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve online test-time adaptation over HTTP: POST /v1/retrieve adapts on the queries and ranks the gallery."""
    try:
        import uvicorn

        from qshift.serve.app import AppSettings, create_app
        from qshift.serve.inputs import InputLimits
        from qshift.serve.service import ServeSpec, build_service
    except ImportError as e:
        _error(f"qshift serve needs FastAPI and uvicorn ({e}); install the extra: pip install 'qshift[serve]'")
        raise typer.Exit(2)
    level = log_level.upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        _error(f"--log-level must be debug, info, warning or error, got {log_level!r}")
        raise typer.Exit(2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    log = logging.getLogger("qshift.serve")
    spec = ServeSpec(method=method, settings=list(set_ or []), model=model, weights=weights,
                     direction=direction.value, split=split.value, dataset=dataset,
                     data_root=None if data_root is None else str(data_root),
                     annotation=None if annotation is None else str(annotation),
                     gallery_embeddings=None if gallery_embeddings is None else str(gallery_embeddings),
                     gallery_ids=None if gallery_ids is None else str(gallery_ids), device=device,
                     preprocess=preprocess, state_dir=None if state_dir is None else str(state_dir),
                     checkpoint_every=checkpoint_every, fresh=fresh, limits=InputLimits(image_root=image_root))
    try:
        service = build_service(spec)
    except USER_ERRORS as e:
        _error(e)
        raise typer.Exit(2)
    if host not in LOOPBACK and not api_key:
        log.warning("binding %s without --api-key: anyone who reaches it can reset or stop the service", host)
    holder: dict = {}
    settings = AppSettings(api_key=api_key or None, max_request_queries=max_request_queries, max_k=max_k,
                           request_timeout_s=request_timeout, max_wait_ms=max_wait_ms, max_queue=max_queue,
                           on_shutdown=lambda: setattr(holder["server"], "should_exit", True))
    server = uvicorn.Server(uvicorn.Config(create_app(service, settings), host=host, port=port,
                                           log_level=log_level.lower(), timeout_graceful_shutdown=30))
    holder["server"] = server
    server.run()
