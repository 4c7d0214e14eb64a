"""The FastAPI application: the own JSON API (``/api``, documented at ``/docs``), the A1111- and OpenAI-compatible
subsets (``a1111.py``, ``openai_api.py``), finished files at capability URLs (PNGs; a video model's animated
WebPs; an audio model's WAVs), and the web page.

One ``JobQueue`` (one worker thread) runs every generation; the handlers only check input, queue and wait. An API
key, when set, is asked of every API route (``Authorization: Bearer KEY``, ``X-API-Key: KEY`` or HTTP basic auth
with KEY as the password) and compared in constant time; the page and the image URLs (random 128-bit tokens) need
none.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hmac
import json
import typing
from dataclasses import dataclass, field
from importlib import resources

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, create_model

from latentdiff.diffusion.sampling import SAMPLERS
from latentdiff.serve import a1111, openai_api
from latentdiff.serve.common import error_body, finished, image_url, submit
from latentdiff.serve.inputs import DEFAULT_FPS, BadInput, GenerationInput, Limits, b64_image, model_kind
from latentdiff.serve.queue import MEDIA_TYPES, ImageStore, Job, JobQueue, QueueFull

FINISHED = ("done", "failed", "cancelled")
OPEN_PATHS = ("/", "/docs", "/openapi.json", "/images/", "/docs/oauth2-redirect")  # no API key asked


@dataclass
class ServeConfig:
    """``latentdiff serve``: where to listen, what one request may ask, how much is kept."""

    host: str = "127.0.0.1"
    port: int = 7860  # AUTOMATIC1111's port, so its clients' defaults find us
    api_key: str = ""  # empty: no key asked
    queue_size: int = 4  # jobs waiting behind the running one; more are answered 429
    store_images: int = 256  # finished files (PNG, WebP, WAV) kept in memory for their URLs (oldest dropped)
    store_bytes: int = 256 * 2**20
    previews: int = 8  # preview images per job (0: none)
    limits: Limits = field(default_factory=Limits)


def _body_model() -> type[BaseModel]:
    """The own API's request: ``GenerationInput``'s fields, images as base64 strings; unknown fields refused."""
    hints = typing.get_type_hints(GenerationInput)
    fields = {f.name: (hints[f.name], ... if f.default is dataclasses.MISSING else f.default)
              for f in dataclasses.fields(GenerationInput)
              if f.name not in ("image", "mask")}
    return create_model("GenerateBody", __config__=ConfigDict(extra="forbid"), **fields,
                        image=(str | None, None),  # base64 PNG/JPEG (or a data: URL): img2img, inpainting with mask
                        mask=(str | None, None))  # base64, the image's size: white repaints, black keeps


GenerateBody = _body_model()


def create_app(pipe, config: ServeConfig | None = None) -> FastAPI:
    """The server's app over ``pipe`` (a ``latentdiff.Pipeline``); ``app.state.queue.close()`` stops its worker."""
    config = config or ServeConfig()
    app = FastAPI(title="latentdiff", summary="Latent diffusion: own API, A1111- and OpenAI-compatible subsets")
    app.state.pipe, app.state.config, app.state.limits = pipe, config, config.limits
    app.state.store = ImageStore(config.store_images, config.store_bytes)
    app.state.queue = JobQueue(pipe, app.state.store, config.queue_size, previews=config.previews)
    app.add_middleware(_BodyLimit, max_bytes=config.limits.request_bytes())
    _add_auth(app, config.api_key)
    _add_error_handlers(app)
    app.include_router(_own_api())
    app.include_router(a1111.router())
    app.include_router(openai_api.router())

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> str:
        return resources.files("latentdiff.serve").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.get("/images/{name}", tags=["images"],
             summary="A finished file: TOKEN.png (with its parameters), TOKEN.webp (a clip), TOKEN.wav (audio)")
    def image(name: str) -> Response:
        data = app.state.store.get(name)
        if data is None:
            raise HTTPException(404, "no such image (images are kept in memory, the oldest dropped)")
        media_type = MEDIA_TYPES[name[name.rindex("."):]]
        return Response(data, media_type=media_type, headers={"Cache-Control": "private, max-age=3600"})

    return app


def _own_api() -> APIRouter:
    api = APIRouter(prefix="/api", tags=["latentdiff"])

    @api.get("/info", summary="The model, its samplers and sizes, and the server's limits")
    def info(request: Request) -> dict:
        state = request.app.state
        pipe = state.pipe
        return {"model": pipe.name, "kind": model_kind(pipe), **_media_info(pipe),
                "default_size": pipe.default_size, "size_multiple": _size_multiple(pipe),
                "samplers": sorted(SAMPLERS), "defaults": {k: v for k, v in pipe.settings().__dict__.items()},
                "limits": state.limits.__dict__, "queue_size": state.config.queue_size,
                "previews": pipe.preview_decoder is not None or pipe.default_size ** 2 <= 256 * 256}

    @api.post("/generate", status_code=202,
              summary="Queue a generation (text-to-image, img2img, inpainting; clips of a video model; audio)")
    async def generate(body: GenerateBody, request: Request, wait: bool = False) -> dict:
        limits = request.app.state.limits
        inp = GenerationInput(**body.model_dump(exclude={"image", "mask"}))
        if body.image is not None:
            inp.image = b64_image(body.image, "image", limits)
        if body.mask is not None:
            inp.mask = b64_image(body.mask, "mask", limits)
        job = submit(request, inp, "latentdiff")
        if wait:
            await finished(job)
        return _job_status(request, job)

    @api.get("/jobs/{job_id}", summary="A job's state, progress and images")
    def job_status(job_id: str, request: Request) -> dict:
        return _job_status(request, _job(request, job_id))

    @api.post("/jobs/{job_id}/cancel", summary="Cancel a queued or running job")
    def cancel(job_id: str, request: Request) -> dict:
        job = _job(request, job_id)
        request.app.state.queue.cancel(job)
        return _job_status(request, job)

    @api.get("/jobs/{job_id}/events", summary="Server-sent events: progress (with preview images), then the result")
    async def events(job_id: str, request: Request) -> StreamingResponse:
        job = _job(request, job_id)
        return StreamingResponse(_event_stream(request, job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    return api


def _media_info(pipe) -> dict:
    """A video model's clip length (``frames``, most ``max_frames``, default ``fps``); an audio model's ``seconds``."""
    kind = model_kind(pipe)
    if kind == "video":
        return {"frames": pipe.clip_length(None), "max_frames": pipe.denoiser.network.config.max_frames,
                "fps": DEFAULT_FPS}
    if kind == "audio":
        spec = pipe.index.audio
        return {"seconds": spec.seconds(pipe.audio_frames(None)), "sample_rate": spec.sample_rate}
    return {}


def _size_multiple(pipe) -> int:
    step = pipe.autoencoder.factor
    while True:  # the smallest multiple of the autoencoder's factor the model takes
        try:
            pipe.image_size(step, step)
            return step
        except ValueError:
            step += pipe.autoencoder.factor


def _job(request: Request, job_id: str) -> Job:
    job = request.app.state.queue.jobs.get(job_id)
    if job is None:
        raise HTTPException(404, f"job_id: no job {job_id!r} (finished jobs are kept for a while only)")
    return job


def _job_status(request: Request, job: Job) -> dict:
    return {**job.status(), "images": [image_url(request, t) for t in job.images]}


async def _event_stream(request: Request, job: Job):
    """``progress`` events while the job runs (``preview``: a PNG data URL, when it changed), then one of
    ``done`` / ``failed`` / ``cancelled`` with the job's status."""
    seen, preview = -1, None
    job.watched = True  # previews from now on
    while True:
        if await request.is_disconnected():
            return
        if job.version != seen:
            seen = job.version
            status = _job_status(request, job)
            if job.state in FINISHED:
                yield f"event: {job.state}\ndata: {json.dumps(status)}\n\n"
                return
            if job.preview is not None and job.preview is not preview:
                preview = job.preview
                status["preview"] = "data:image/png;base64," + base64.b64encode(preview).decode()
            yield f"event: progress\ndata: {json.dumps(status)}\n\n"
        await asyncio.sleep(0.05)


class _BodyLimit:
    """Pure ASGI: a request body over ``max_bytes`` is answered 413, by its Content-Length before it is read, or
    counted while it streams in (chunked): then the app sees the client leave and whatever it answers is dropped."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = JSONResponse({"detail": f"body: the request is larger than {self.max_bytes} bytes", "field": "body"},
                               413)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_big(scope, receive, send)
        seen, refused = 0, False

        async def counted():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                refused = True
                await too_big(scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def unless_refused(message):
            if not refused:
                await send(message)

        return await self.app(scope, counted, unless_refused)


def _add_auth(app: FastAPI, key: str) -> None:
    if not key:
        return
    want = key.encode()

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        path = request.url.path
        if path in OPEN_PATHS or path.startswith("/images/"):
            return await call_next(request)
        if not any(hmac.compare_digest(given, want) for given in _keys_given(request)):
            return JSONResponse({"detail": "authorization: a valid API key is required (Authorization: Bearer KEY)"},
                                401, headers={"WWW-Authenticate": 'Bearer, Basic realm="latentdiff"'})
        return await call_next(request)


def _keys_given(request: Request) -> list[bytes]:
    """The keys a request offers: bearer token, X-API-Key, or the password of HTTP basic auth."""
    out = [request.headers.get("x-api-key", "").encode()]
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer":
        out.append(value.strip().encode())
    elif scheme.lower() == "basic":
        try:
            out.append(base64.b64decode(value.strip()).partition(b":")[2])
        except ValueError:
            pass
    return [k for k in out if k]


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BadInput)
    async def bad_input(request: Request, e: BadInput):
        return JSONResponse(error_body(request, e.status, e.field, e.message), e.status)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, e: QueueFull):
        return JSONResponse(error_body(request, 429, "queue", str(e)), 429,
                            headers={"Retry-After": str(e.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        name = ".".join(loc) or "body"
        message = first.get("msg", "invalid")
        body = error_body(request, 422, name, message)
        body["errors"] = [{"field": ".".join(str(p) for p in x.get("loc", ())), "message": x.get("msg", "")}
                          for x in errors]
        return JSONResponse(body, 422)
