"""The HTTP API: FastAPI over the batching engine.

    GET  /generate?class=207&mode=cca&seed=0    -> PNG (seed echoed in X-Seed)
    POST /generate                               -> JSON with base64 PNGs and per-image costs
    GET  /compare?class=207&seed=0               -> the four modes side by side (PNG or JSON)
    GET  /stats, /metrics, /health, /models

Models are named by registry key only; a request never carries a path.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
from collections.abc import Sequence
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel, ConfigDict, Field, field_validator

from samplers.images import comparison_grid, image_grid, png_bytes
from samplers.modes import (
    MAX_CFG_INTERVAL,
    MAX_CFG_SCALE,
    MAX_SEED,
    MAX_TEMPERATURE,
    MAX_TOP_K,
    MODE_HELP,
    MODES,
    InvalidRequest,
    SamplingOptions,
    normalize_mode,
)
from samplers.pipeline import ImageResult
from samplers.validation import clip, short

from .engine import Engine, QueueFull, RequestCancelled, RequestTimeout
from .http import RequestGuard
from .stats import prometheus

log = logging.getLogger("ccaserve.server")

MAX_N = 16  # images per request (a grid)
MAX_REPORTED_ERRORS = 20


class ApiError(Exception):
    """422 with the offending field, its allowed range and a message."""

    def __init__(self, field_name: str, message: str, allowed: Any = None, status: int = 422):
        super().__init__(message)
        self.field, self.message, self.allowed, self.status = field_name, message, allowed, status


class ModelServer:
    """The loaded models (registry name -> engine); injected into the endpoints."""

    def __init__(self, engines: dict[str, Engine], default: str | None = None):
        if not engines:
            raise ValueError("no engines")
        self.engines = engines
        self.default = default or next(iter(engines))

    def engine(self, name: str | None) -> Engine:
        name = self.default if name is None else name
        if name not in self.engines:
            raise ApiError("model", f"unknown model {short(name)}", allowed=list(self.engines))
        return self.engines[name]

    def close(self) -> None:
        for e in self.engines.values():
            e.close()


# ---- request / response models --------------------------------------------------------------
class _SamplingFields(BaseModel):
    """Fields every sampling endpoint takes (unknown ones are rejected)."""

    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    class_id: int = Field(207, alias="class", ge=0, description="class id in [0, num_classes - 1] of the model")
    class_name: str | None = Field(None, max_length=200, description="the class by name instead of id: a whole "
                                   "name or words of one ('golden retriever', 'red shaded triangle'); 422 lists "
                                   "the candidates when several classes match")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="seed of the first image (random when omitted); "
                             "image i of a grid uses seed + i")
    cfg_scale: float | None = Field(None, ge=0.0, le=MAX_CFG_SCALE, allow_inf_nan=False,
                                    description="guidance scale of cfg modes (default: the model's for the mode, "
                                    "GET /models: default_cfg_scale for cfg, default_cca_cfg_scale for cca+cfg); "
                                    "1 = unguided; ignored by free and cca")
    cfg_interval: int = Field(-1, ge=-1, le=MAX_CFG_INTERVAL, description="guide only tokens 0..cfg_interval+1; "
                              "-1 = all")
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False, description="0 = greedy")
    top_k: int = Field(0, ge=0, le=MAX_TOP_K, description="0 = no top-k filter, 1 = greedy")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False, description="1 = no nucleus filter")
    cfg_schedule: Literal["linear", "constant"] | None = Field(
        None, description="VAR models: guidance ramped over the scales (linear, their default) or constant")
    more_smooth: bool = Field(False, description="VAR models: VAR's soft Gumbel display option")
    model: str | None = Field(None, max_length=128, description="registry name of a loaded model (GET /models)")

    @field_validator("class_id", "seed", "cfg_interval", "top_k", "n", "cfg_scale", "temperature", "top_p",
                     mode="before", check_fields=False)
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        if isinstance(value, bool):  # JSON true is not the number 1
            raise ValueError("expected a number, got a boolean")
        return value


class SamplingParams(_SamplingFields):
    mode: str | None = Field(None, max_length=32, description=f"{MODE_HELP}; default cca when a CCA model is "
                             "loaded, else cfg")
    n: int = Field(1, ge=1, le=MAX_N, description=f"images per request, 1..{MAX_N} (a grid for GET)")


class CompareParams(_SamplingFields):
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the image in every mode")
    format: Literal["png", "json"] = Field("png", description="png grid or json")


class GeneratedImage(BaseModel):
    png_base64: str
    class_id: int
    class_name: str
    seed: int
    mode: str
    cfg_scale: float
    latency_s: float = Field(description="submit -> image ready")
    queue_wait_s: float = Field(description="submit -> first decoding step")
    rows_x_steps: int = Field(description="cost: KV-cache rows used, summed over decoding steps")


class GenerateResponse(BaseModel):
    model: str
    mode: str
    images: list[GeneratedImage]


class ModelInfo(BaseModel):
    name: str
    family: str = Field(description="llamagen (next-token) or var (next-scale)")
    modes: list[str]
    default_mode: str
    default_cfg_scale: float = Field(description="the cfg mode's scale when a request names none")
    default_cca_cfg_scale: float = Field(description="the cca+cfg mode's scale when a request names none (it "
                                         "guides other weights than cfg, so it has its own best scale)")
    guidance: str = Field(description="what cfg_scale means for this model")
    image_size: int
    tokens: int = Field(description="tokens per image")
    steps: int = Field(description="decoding steps per image (tokens for llamagen, scales for var)")
    num_classes: int
    class_names: list[str] | None


# ---- helpers --------------------------------------------------------------------------------
def _class_of(engine: Engine, p: _SamplingFields) -> int:
    if p.class_name is None:
        return p.class_id
    if "class_id" in p.model_fields_set:
        raise ApiError("class_name", "give class or class_name, not both")
    return engine.pipeline.resolve_class(p.class_name, field="class_name")


def _validate(engine: Engine, p: SamplingParams) -> tuple[int, str, SamplingOptions]:
    """The request's class, mode and options. Whether this model can serve them (class range, seed,
    weights for the mode, options for its family) the engine checks on submit, the one check every
    caller gets; its InvalidRequest becomes a 422 naming the field."""
    pipe = engine.pipeline
    class_id = _class_of(engine, p)
    mode = normalize_mode(pipe.default_mode if p.mode is None else p.mode)
    if p.seed is not None and p.seed + p.n - 1 > MAX_SEED:
        raise ApiError("seed", "seed + n - 1 exceeds the largest seed", allowed=f"[0, {MAX_SEED}]")
    opts = pipe.options_for(mode, cfg_scale=p.cfg_scale, cfg_interval=p.cfg_interval, temperature=p.temperature,
                            top_k=p.top_k, top_p=p.top_p, cfg_schedule=p.cfg_schedule, more_smooth=p.more_smooth)
    return class_id, mode, opts


async def _run(engine: Engine, request: Request, jobs: Sequence[tuple[int, str, int, SamplingOptions]]
               ) -> list[ImageResult]:
    """Submit images, await them, and cancel them if the client disconnects meanwhile."""
    submitted = engine.submit_many(list(jobs))
    futures = [asyncio.wrap_future(r.future) for r in submitted]
    gathered = asyncio.gather(*futures)
    gathered.add_done_callback(lambda f: f.cancelled() or f.exception())  # consumed: no "never retrieved"
    try:
        while True:
            done, _ = await asyncio.wait({gathered}, timeout=0.25)
            if done:
                return gathered.result()
            if await request.is_disconnected():
                raise RequestCancelled("client disconnected")
    except BaseException:
        for r in submitted:
            engine.cancel(r)
        gathered.cancel()
        raise


def _seeds(p: SamplingParams) -> list[int]:
    first = p.seed if p.seed is not None else random.randrange(0, MAX_SEED - MAX_N)
    return [first + i for i in range(p.n)]


def _image_json(engine: Engine, r: ImageResult) -> GeneratedImage:
    return GeneratedImage(png_base64=base64.b64encode(png_bytes(r.image)).decode(), class_id=r.class_id,
                          class_name=engine.pipeline.class_name(r.class_id), seed=r.seed, mode=r.mode,
                          cfg_scale=r.options.cfg_scale, latency_s=round(r.latency_s, 4),
                          queue_wait_s=round(r.queue_wait_s, 4), rows_x_steps=r.rows_x_steps)


# ---- the app --------------------------------------------------------------------------------
def get_server(request: Request) -> ModelServer:
    """The loaded models, injected into every endpoint (tests and embedders can swap app.state.server)."""
    return request.app.state.server


Server = Annotated[ModelServer, Depends(get_server)]


def create_app(server: ModelServer) -> FastAPI:
    # FastAPIOffline serves Swagger UI's files itself: /docs works without internet (no CDN)
    app = FastAPIOffline(title="ccaserve", version="0.1",
                  description="Class-conditional AR image generation in four modes (free, cfg, cca, cca+cfg) "
                              "with continuous batching and cost statistics.")
    app.state.server = server
    app.add_middleware(RequestGuard)  # body-size limit (413), no Gradio uploads

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        server.engines[server.default].stats.error(exc.status)
        body = {"detail": [{"field": exc.field, "message": exc.message, "allowed": exc.allowed}]}
        return JSONResponse(body, status_code=exc.status)

    @app.exception_handler(InvalidRequest)
    async def _invalid_request(request: Request, exc: InvalidRequest) -> JSONResponse:
        server.engines[server.default].stats.error(422)
        body = {"detail": [{"field": exc.field, "message": str(exc), "allowed": exc.allowed}]}
        return JSONResponse(body, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        server.engines[server.default].stats.error(422)
        detail = []
        errors = exc.errors()
        for err in errors[:MAX_REPORTED_ERRORS]:  # 200k bad keys must not make a 15 MB answer
            loc = [str(x) for x in err.get("loc", ()) if x not in ("query", "body") and not isinstance(x, int)]
            ctx = {k: v for k, v in (err.get("ctx") or {}).items() if isinstance(v, int | float | str)}
            field = ".".join(loc) or ("body" if tuple(err.get("loc", ()))[:1] == ("body",) else "request")
            detail.append({"field": clip(field, 64), "message": clip(str(err.get("msg", "invalid"))),
                           "allowed": {k: clip(v, 64) if isinstance(v, str) else v for k, v in ctx.items()} or None})
        if len(errors) > MAX_REPORTED_ERRORS:
            detail.append({"field": "request", "message": f"{len(errors) - MAX_REPORTED_ERRORS} more errors not shown",
                           "allowed": None})
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        server.engines[server.default].stats.error(503)
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after_s)})

    @app.exception_handler(RequestTimeout)
    async def _timeout(request: Request, exc: RequestTimeout) -> JSONResponse:
        server.engines[server.default].stats.error(504)
        return JSONResponse({"detail": str(exc)}, status_code=504)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:  # never leak a stack trace
        log.exception("unhandled error on %s", request.url.path)
        server.engines[server.default].stats.error(500)
        return JSONResponse({"detail": "internal error"}, status_code=500)

    async def _generate(server: ModelServer, request: Request, p: SamplingParams) -> tuple[Engine, str,
                                                                                          list[ImageResult]]:
        engine = server.engine(p.model)
        class_id, mode, opts = _validate(engine, p)
        try:
            results = await _run(engine, request, [(class_id, mode, s, opts) for s in _seeds(p)])
        except RequestCancelled:
            engine.stats.error("client_closed")
            return engine, mode, []
        return engine, mode, results

    @app.get("/generate", response_class=Response, responses={200: {"content": {"image/png": {}}}},
             summary="Generate a PNG (a grid when n > 1)")
    async def generate_png(server: Server, request: Request, params: Annotated[SamplingParams, Query()]) -> Response:
        engine, mode, results = await _generate(server, request, params)
        if not results:
            return Response(status_code=499)
        img = results[0].image if len(results) == 1 else image_grid([r.image for r in results], min(4, len(results)))
        headers = {"X-Seed": ",".join(str(r.seed) for r in results), "X-Mode": mode,
                   "X-Class-Name": engine.pipeline.class_name(results[0].class_id).encode("ascii", "replace").decode(),
                   "X-Latency-S": f"{max(r.latency_s for r in results):.4f}",
                   "X-Queue-Wait-S": f"{max(r.queue_wait_s for r in results):.4f}",
                   "X-Rows-X-Steps": ",".join(str(r.rows_x_steps) for r in results)}
        return Response(png_bytes(img), media_type="image/png", headers=headers)

    @app.post("/generate", response_model=GenerateResponse, summary="Generate images, JSON with base64 PNGs")
    async def generate_json(server: Server, request: Request, params: SamplingParams) -> Any:
        engine, mode, results = await _generate(server, request, params)
        if not results:
            return Response(status_code=499)
        return GenerateResponse(model=engine.pipeline.name, mode=mode,
                                images=[_image_json(engine, r) for r in results])

    @app.get("/compare", summary="The same class and seed in every available mode, side by side",
             responses={200: {"content": {"image/png": {}, "application/json": {}}}})
    async def compare(server: Server, request: Request, params: Annotated[CompareParams, Query()]) -> Any:
        engine = server.engine(params.model)
        pipe = engine.pipeline
        class_id, seed = _class_of(engine, params), params.seed
        jobs = []
        for mode in pipe.modes:
            p = SamplingParams(**params.model_dump(exclude={"format", "class_name", "class_id"}), mode=mode)
            _, m, opts = _validate(engine, p)
            jobs.append((class_id, m, seed, opts))
        try:
            results = await _run(engine, request, jobs)
        except RequestCancelled:
            return Response(status_code=499)
        if params.format == "json":
            return GenerateResponse(model=pipe.name, mode="compare", images=[_image_json(engine, r) for r in results])
        labels = [f"{r.mode}" + (f" (s={r.options.cfg_scale:g})" if r.options.guided else "")
                  + f"\n{r.latency_s:.2f} s, {r.rows}x compute" for r in results]
        grid = comparison_grid([[r.image for r in results]], labels, [f"{class_id}: {pipe.class_name(class_id)}"])
        return Response(png_bytes(grid), media_type="image/png", headers={"X-Seed": str(seed)})

    @app.get("/stats", summary="Throughput, latency percentiles, batch occupancy, per mode and overall")
    async def stats(server: Server, model: Annotated[str | None, Query(description="registry name")] = None
                    ) -> dict[str, Any]:
        engine = server.engine(model)
        snap = engine.stats.snapshot()
        snap["model"] = engine.pipeline.name
        snap["queue"] = {"length": engine.queue_length(), "max": engine.max_queue}
        snap["rows_in_use"] = engine.rows_in_use()
        snap["max_rows_per_step"] = engine.max_rows
        snap["devices"] = engine.devices()
        return snap

    @app.get("/metrics", response_class=PlainTextResponse, summary="The /stats numbers in Prometheus text format")
    async def metrics(server: Server) -> PlainTextResponse:
        engine = server.engine(None)
        lines = [prometheus(engine.stats.snapshot()).rstrip("\n"),
                 "# HELP ccaserve_queue_length Requests waiting for rows, by model (scale out when it stays > 0).",
                 "# TYPE ccaserve_queue_length gauge",
                 *(f'ccaserve_queue_length{{model="{name}"}} {e.queue_length()}' for name, e in server.engines.items()),
                 "# HELP ccaserve_rows_busy_fraction Share of the KV-cache rows in use, by model and device.",
                 "# TYPE ccaserve_rows_busy_fraction gauge"]
        for name, e in server.engines.items():
            for i, d in enumerate(e.devices()):
                busy = sum(d["rows_in_use"].values()) / max(1, d["max_rows"] * len(d["rows_in_use"]))
                lines.append(f'ccaserve_rows_busy_fraction{{model="{name}",device="{d["device"]}",replica="{i}"}} '
                             f"{busy:.4f}")
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def root(request: Request) -> RedirectResponse:
        has_ui = any(getattr(r, "path", None) == "/ui" for r in request.app.routes)
        return RedirectResponse("/ui/" if has_ui else "/docs")

    @app.get("/health")
    async def health(server: Server) -> dict[str, Any]:
        return {"status": "ok", "models": list(server.engines),
                "queue": {k: e.queue_length() for k, e in server.engines.items()}}

    @app.get("/models", response_model=list[ModelInfo])
    async def models(server: Server) -> list[ModelInfo]:
        out = []
        for name, e in server.engines.items():
            p = e.pipeline
            out.append(ModelInfo(name=name, family=p.family.name, modes=p.modes, default_mode=p.default_mode,
                                 default_cfg_scale=p.default_cfg_scale, default_cca_cfg_scale=p.default_cca_cfg_scale,
                                 guidance=p.guidance, image_size=p.image_size,
                                 tokens=p.tokens_per_image, steps=p.steps_per_image, num_classes=p.num_classes,
                                 class_names=p.class_names))
        return out

    return app


__all__ = ["create_app", "ModelServer", "SamplingParams", "MODES"]
