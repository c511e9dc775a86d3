"""The FastAPI app of ``qshift serve`` (docs/serve.md): retrieve, reset, checkpoint, shutdown, status,
health and Prometheus metrics over one :class:`~qshift.serve.service.Service` and its
:class:`~qshift.serve.batcher.Batcher`.

Every request is answered once: 200 with its own queries' results; 4xx naming the field at fault
(``{"error", "field", "status"}``); 401 without the token on a mutating endpoint; 429 / 503 with
``Retry-After`` when the queue is full or the worker is stopping; 5xx with the reason a batch failed."""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import Counter
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

import qshift
from qshift.errors import UserError
from qshift.serve.batcher import Batcher, BatchFailed, QueueFull, Unavailable, quantiles_ms
from qshift.serve.inputs import QueryError
from qshift.serve.schemas import (CheckpointResponse, ErrorResponse, Query, ResetResponse, RetrieveRequest,
                                  RetrieveResponse, error_body)
from qshift.serve.service import Service

log = logging.getLogger("qshift.serve")

ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 413, 422, 429, 500, 503)}


@dataclass(frozen=True)
class AppSettings:
    """The API's own limits and switches (the batcher's are its constructor's)."""

    api_key: str | None = None  # the Bearer token of the mutating endpoints (None: they are open)
    max_request_queries: int = 256
    max_k: int = 100
    max_body_bytes: int = 64 * 2**20
    request_timeout_s: float = 120.0  # a request not answered by then gets 503 (it never hangs)
    drain_timeout_s: float = 30.0  # on shutdown, how long queued work may still run
    max_wait_ms: float = 20.0
    max_queue: int = 1024
    on_shutdown: Callable[[], None] | None = None  # what POST /v1/shutdown calls (the CLI stops uvicorn)


class _Unauthorized(Exception):
    pass


class _Guard:
    """ASGI middleware: bounds the request body (413) and counts answers per endpoint and status."""

    def __init__(self, app: Any, max_body_bytes: int, counts: Counter) -> None:
        self.app, self.max_body, self.counts = app, max_body_bytes, counts

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.counts[(path, message["status"])] += 1
            await send(message)

        if scope.get("method") != "POST":
            await self.app(scope, receive, counted_send)
            return
        chunks, size = [], 0
        while True:  # read the body here, bounded, then hand it on
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.max_body:
                body = error_body(413, f"request body over {self.max_body} bytes", "body")
                await JSONResponse(body, status_code=413)(scope, receive, counted_send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        body, sent = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, counted_send)


def _field(loc: tuple) -> str:
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "body"


def create_app(service: Service, settings: AppSettings | None = None) -> FastAPI:
    """The app; its lifespan starts the worker, and on shutdown drains the queue and checkpoints."""
    settings = settings or AppSettings()
    batcher = Batcher(service, max_wait_ms=settings.max_wait_ms, max_queue=settings.max_queue)
    counts: Counter = Counter()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        log.info("serving %s (%s, %s) over %d gallery items; B = %d, max wait %g ms", service.adapter.method_name,
                 service.identity.get("direction"), service.identity["model"].get("spec"), service.n_gallery,
                 service.batch_size, settings.max_wait_ms)
        yield
        await anyio.to_thread.run_sync(batcher.close, settings.drain_timeout_s)

    app = FastAPI(title="qshift serve", version=qshift.__version__, lifespan=lifespan,
                  description="Online test-time adaptation for cross-modal retrieval (docs/serve.md).")
    app.state.service, app.state.batcher, app.state.settings, app.state.counts = service, batcher, settings, counts
    app.add_middleware(_Guard, max_body_bytes=settings.max_body_bytes, counts=counts)

    # ------------------------------------------------------------------ errors, all as {"error", "field", "status"}
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {"loc": ("body",), "msg": "invalid request"}
        if first.get("type") == "json_invalid":
            ctx = first.get("ctx", {}).get("error", "")
            return JSONResponse(error_body(400, f"malformed JSON: {ctx or first['msg']}", "body"), status_code=400)
        field = _field(tuple(first["loc"]))
        msg = first["msg"].removeprefix("Value error, ")
        body = error_body(422, f"{field}: {msg}", field)
        body["errors"] = [{"field": _field(tuple(e["loc"])), "error": e["msg"]} for e in errs]
        return JSONResponse(body, status_code=422)

    @app.exception_handler(QueryError)
    async def _query(request: Request, exc: QueryError) -> JSONResponse:
        return JSONResponse(error_body(exc.status, str(exc), exc.field), status_code=exc.status)

    @app.exception_handler(QueueFull)
    async def _full(request: Request, exc: QueueFull) -> JSONResponse:
        return JSONResponse(error_body(429, f"busy: {exc}"), status_code=429,
                            headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(Unavailable)
    async def _unavailable(request: Request, exc: Unavailable) -> JSONResponse:
        return JSONResponse(error_body(503, str(exc)), status_code=503, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(BatchFailed)
    async def _failed(request: Request, exc: BatchFailed) -> JSONResponse:
        return JSONResponse(error_body(exc.status, str(exc)), status_code=exc.status)

    @app.exception_handler(_Unauthorized)
    async def _unauthorized(request: Request, exc: _Unauthorized) -> JSONResponse:
        return JSONResponse(error_body(401, str(exc), "Authorization"), status_code=401,
                            headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(UserError)
    async def _conflict(request: Request, exc: UserError) -> JSONResponse:
        return JSONResponse(error_body(409, str(exc)), status_code=409)

    def require_token(request: Request) -> None:
        """Mutating endpoints: ``Authorization: Bearer <token>`` when the server has a token."""
        if settings.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise _Unauthorized("this endpoint needs Authorization: Bearer <token> (the server's --api-key)")

    async def on_worker(name: str, fn: Callable[[], Any]) -> Any:
        future = batcher.control(name, fn)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), settings.request_timeout_s)
        except TimeoutError:
            raise Unavailable(f"{name} did not run within {settings.request_timeout_s:g} s (the worker is busy)",
                              batcher.retry_after()) from None

    # ------------------------------------------------------------------ endpoints
    @app.post("/v1/retrieve", response_model=RetrieveResponse, responses=ERRORS)
    async def retrieve(req: RetrieveRequest) -> dict:
        """Adapt on the queries (coalesced with other requests into batches of B) and return the top-k
        gallery ids and scores per query."""
        t0 = time.perf_counter()
        if len(req.queries) > settings.max_request_queries:
            raise QueryError("queries", f"{len(req.queries)} queries; at most {settings.max_request_queries} per "
                                        "request (split them)")
        if req.k > settings.max_k:
            raise QueryError("k", f"k = {req.k}; at most {settings.max_k}")
        rows = await anyio.to_thread.run_sync(_decode_all, service, req.queries)
        job = batcher.submit(rows, req.k)
        try:
            answer = await asyncio.wait_for(asyncio.wrap_future(job.future), settings.request_timeout_s)
        except TimeoutError:
            batcher.cancel(job)
            raise Unavailable(f"not answered within {settings.request_timeout_s:g} s (the worker is overloaded); "
                              "its queries not yet adapted on were dropped", batcher.retry_after()) from None
        except asyncio.CancelledError:  # the client went away
            batcher.cancel(job)
            raise
        batcher.latencies.append(time.perf_counter() - t0)
        ids = service.gallery_ids
        return {"results": [{"id": q.id, "ids": [ids[i] for i in rows_], "scores": sc}
                            for q, rows_, sc in zip(req.queries, answer.rows, answer.scores)],
                "k": req.k, "batches": answer.batches}

    @app.post("/v1/reset", response_model=ResetResponse, responses=ERRORS, dependencies=[Depends(require_token)])
    async def reset() -> dict:
        """Back to the source parameters (after the batches queued before this request)."""
        def run() -> dict:
            service.reset()
            return {"reset": True, "batches": service.counters["batches"], "state_digest": service.state_digest}
        return await on_worker("reset", run)

    @app.post("/v1/checkpoint", response_model=CheckpointResponse, responses=ERRORS,
              dependencies=[Depends(require_token)])
    async def checkpoint() -> dict:
        """Write a checkpoint now (needs --state-dir)."""
        if service.store is None:
            raise UserError("no state folder: start the server with --state-dir DIR to checkpoint")
        meta = await on_worker("checkpoint", service.checkpoint)
        return {k: v for k, v in meta.items() if k != "identity"}

    @app.post("/v1/shutdown", status_code=202, responses=ERRORS, dependencies=[Depends(require_token)])
    async def shutdown() -> dict:
        """Stop the server: queued work is finished, a final checkpoint written, then the process exits."""
        if settings.on_shutdown is None:
            return JSONResponse(error_body(501, "this app was not started by `qshift serve`; stop its host"),
                                status_code=501)
        log.info("shutdown requested over the API")
        settings.on_shutdown()
        return {"shutting_down": True}

    @app.get("/v1/status")
    async def status() -> dict:
        """Counters, queue depth, latency quantiles, the collapse guard, checkpoints and the protocol."""
        return _status(service, batcher, settings, counts)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        """200 while the worker runs; 503 when it is stopping or stopped."""
        ok = batcher.alive
        return JSONResponse({"status": "ok" if ok else "unavailable", "batches": service.counters["batches"]},
                            status_code=200 if ok else 503)

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus text format."""
        return PlainTextResponse(_metrics(service, batcher, counts), media_type="text/plain; version=0.0.4")

    return app


def _decode_all(service: Service, queries: list[Query]) -> list[Any]:
    return [service.codec.decode(q.raw(), f"queries[{i}]") for i, q in enumerate(queries)]


def _status(service: Service, batcher: Batcher, settings: AppSettings, counts: Counter) -> dict[str, Any]:
    adapter, store = service.adapter, service.store
    guard = adapter.method.guard
    last = batcher.last_batch or {}
    requests: dict[str, dict[str, int]] = {}
    for (path, code), n in sorted(counts.items()):
        requests.setdefault(path, {})[str(code)] = n
    return {
        "qshift": qshift.__version__, "model": service.identity["model"], "direction": service.identity["direction"],
        "gallery": service.identity["gallery"], "method": adapter.method_name, "protocol": service.protocol(),
        "method_options": {k: v for k, v in adapter.config.items() if k not in service.protocol()},
        "batches": service.counters["batches"], "queries": service.counters["queries"],
        "method_batches_seen": adapter.method.batches_seen, "batch_failures": batcher.failures,
        "last_failure": batcher.last_failure, "last_batch": batcher.last_batch,
        "queue": batcher.queue_depth(), "max_wait_ms": settings.max_wait_ms,
        "latency_ms": {**quantiles_ms(batcher.latencies), "window": len(batcher.latencies)},
        "batch_ms": {**quantiles_ms(batcher.batch_seconds), "window": len(batcher.batch_seconds)},
        "collapse_guard": {"enabled": guard is not None, "resets": adapter.collapse_resets,
                           "last_signals": last.get("guard"),
                           **({"window": guard.window, "ratio": guard.ratio, "signal": guard.signal}
                              if guard is not None else {})},
        "checkpoints": {"state_dir": None if store is None else str(store.folder),
                        "every": service.checkpoint_every if store is not None else None,
                        "last": None if store is None or store.last is None else
                        {k: store.last.get(k) for k in ("batches", "saved_at", "state_file")},
                        "resumed_from": service.resumed},
        "state_digest": service.state_digest, "requests": requests, "worker_alive": batcher.alive,
        "uptime_s": round(time.time() - batcher.started_at, 1), "auth": settings.api_key is not None,
    }


def _metrics(service: Service, batcher: Batcher, counts: Counter) -> str:
    lines = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{labels} {value:g}" for labels, value in samples)

    depth = batcher.queue_depth()
    metric("qshift_batches_total", "counter", "Adaptation batches run.", [("", service.counters["batches"])])
    metric("qshift_queries_total", "counter", "Queries adapted on and answered.", [("", service.counters["queries"])])
    metric("qshift_batch_failures_total", "counter", "Batches that failed and were rolled back.",
           [("", batcher.failures)])
    metric("qshift_collapse_resets_total", "counter", "Resets by the collapse guard.",
           [("", service.adapter.collapse_resets)])
    metric("qshift_queue_queries", "gauge", "Queries waiting for a batch.", [("", depth["queries"])])
    metric("qshift_requests_total", "counter", "HTTP answers by endpoint and status.",
           [(f'{{path="{p}",code="{c}"}}', n) for (p, c), n in sorted(counts.items())])
    for name, values, help_ in (("qshift_request_latency_seconds", batcher.latencies, "Retrieve latency."),
                                ("qshift_batch_seconds", batcher.batch_seconds, "Adaptation time per batch.")):
        q = quantiles_ms(values)
        metric(name, "summary", help_ + " (recent window)",
               [(f'{{quantile="{float(k[1:]) / 100:g}"}}', v / 1000) for k, v in q.items() if v is not None])
    return "\n".join(lines) + "\n"
