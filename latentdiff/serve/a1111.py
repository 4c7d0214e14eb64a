"""The AUTOMATIC1111 web UI API subset its clients use (``/sdapi/v1``): txt2img, img2img (with mask), samplers,
models, progress, interrupt, and the options (read-only). Fields we do not implement (hires fix, restore faces,
scripts, ...) are accepted and ignored, as A1111 ignores what a script does not read; images are raw base64 PNGs
carrying their parameters (a video model's clips: animated WebPs; an audio model's: WAVs), ``info`` a JSON string.
The own API's ``frames`` / ``fps`` (video) and ``seconds`` (audio) are taken as extra fields, checked as there;
an audio model ignores A1111's default 512 x 512 but refuses a width or height given."""

from __future__ import annotations

import base64
import json

from fastapi import APIRouter, HTTPException, Request
from pydantic import ConfigDict, Field

from latentdiff.diffusion.sampling import SAMPLERS
from latentdiff.serve.common import MediaFields, file_of, finished, submit
from latentdiff.serve.inputs import BadInput, GenerationInput, b64_image, model_kind

SCHEDULES = {"karras": "karras", "exponential": "exponential", "uniform": "linspace", "sgm uniform": "trailing"}


class Txt2ImgBody(MediaFields):
    """What A1111 reads of a txt2img request (other fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    prompt: str = ""
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 50
    cfg_scale: float = 7.0
    seed: int = -1
    batch_size: int = 1
    n_iter: int = 1
    sampler_name: str | None = None
    sampler_index: str | None = None  # the old name of sampler_name
    scheduler: str | None = None  # "automatic", "Karras", "Exponential", ...


class Img2ImgBody(Txt2ImgBody):
    init_images: list[str] = Field(default_factory=list)
    mask: str | None = None  # white repaints
    denoising_strength: float = 0.75
    inpainting_mask_invert: int = 0  # 1: black repaints


def router() -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111-compatible"])

    @api.post("/txt2img", summary="Text to image (A1111)")
    async def txt2img(body: Txt2ImgBody, request: Request) -> dict:
        return await _run(request, body, _input(body, request))

    @api.post("/img2img", summary="Image to image, inpainting with mask (A1111)")
    async def img2img(body: Img2ImgBody, request: Request) -> dict:
        limits = request.app.state.limits
        inp = _input(body, request)
        if len(body.init_images) != 1:
            raise BadInput("init_images", f"expected one image, got {len(body.init_images)}")
        inp.image = b64_image(body.init_images[0], "init_images", limits)
        if body.mask:
            mask = b64_image(body.mask, "mask", limits).convert("L")
            inp.mask = mask.point(lambda v: 255 - v) if body.inpainting_mask_invert else mask
        inp.strength = body.denoising_strength
        return await _run(request, body, inp)

    @api.get("/samplers", summary="Sampler names (A1111's display names and ours)")
    def samplers() -> list[dict]:
        canonical: dict = {}
        for name, (fn, _) in SAMPLERS.items():  # canonical names come first in the registry
            canonical.setdefault(fn, name)
        return [{"name": name, "aliases": [canonical[fn]], "options": {}} for name, (fn, _) in SAMPLERS.items()
                if name[0].isupper() and not name.endswith("Scheduler")]

    @api.get("/sd-models", summary="The loaded model")
    def sd_models(request: Request) -> list[dict]:
        name = request.app.state.pipe.name
        return [{"title": name, "model_name": name, "hash": None, "sha256": None, "filename": name, "config": None}]

    @api.get("/options", summary="Options (read-only)")
    def options(request: Request) -> dict:
        pipe = request.app.state.pipe
        formats = {"image": "png", "video": "webp", "audio": "wav"}
        return {"sd_model_checkpoint": pipe.name, "samples_format": formats[model_kind(pipe)],
                "CLIP_stop_at_last_layers": 1}

    @api.get("/progress", summary="Progress of the running job, with its current image")
    def progress(request: Request, skip_current_image: bool = False) -> dict:
        queue = request.app.state.queue
        job = queue.current
        state = {"skipped": False, "interrupted": bool(job and job.cancel_requested),
                 "job_count": queue.waiting() + (job is not None), "sampling_step": job.step if job else 0,
                 "sampling_steps": job.total if job else 0, "job": job.id if job else ""}
        image = None
        if job is not None and not skip_current_image:
            job.watched = True  # previews from now on
        if job is not None and job.preview is not None and not skip_current_image:
            image = base64.b64encode(job.preview).decode()
        return {"progress": job.step / job.total if job else 0.0, "eta_relative": 0.0, "state": state,
                "current_image": image, "textinfo": None}

    @api.post("/interrupt", summary="Stop the running job")
    def interrupt(request: Request) -> dict:
        queue = request.app.state.queue
        if queue.current is not None:
            queue.cancel(queue.current)
        return {}

    return api


def _input(body: Txt2ImgBody, request: Request) -> GenerationInput:
    sampler = body.sampler_name or body.sampler_index
    schedule = SCHEDULES.get((body.scheduler or "").lower())
    size = {"width": body.width, "height": body.height}
    if model_kind(request.app.state.pipe) == "audio":  # its size follows from seconds: only a size given is refused
        size = {name: n if name in body.model_fields_set else None for name, n in size.items()}
    return GenerationInput(prompt=body.prompt, negative_prompt=body.negative_prompt, **size, steps=body.steps,
                           sampler=sampler, schedule=schedule, guidance=body.cfg_scale, seed=body.seed,
                           num_images=body.batch_size * body.n_iter, **body.media())


async def _run(request: Request, body: Txt2ImgBody, inp: GenerationInput) -> dict:
    job = await finished(submit(request, inp, "a1111"))
    if job.state == "failed":
        raise HTTPException(500, f"generation failed: {job.error}")
    images = [base64.b64encode(file_of(request, t)).decode() for t in job.images]
    p = job.parameters
    info = {"prompt": inp.prompt, "all_prompts": [inp.prompt] * len(images), "negative_prompt": inp.negative_prompt,
            "seed": p["seed"], "all_seeds": [p["seed"]] * len(images),
            "width": p.get("width"), "height": p.get("height"),  # audio: none
            "sampler_name": inp.sampler or p["sampler"], "cfg_scale": p["guidance"], "steps": p["steps"],
            "batch_size": inp.num_images, "sd_model_name": p["model"], "interrupted": job.state == "cancelled",
            "infotexts": [json.dumps({**p, "prompt": inp.prompt, "index": i}) for i in range(len(images))]}
    return {"images": images, "parameters": body.model_dump(exclude={"init_images", "mask"}), "info": json.dumps(info)}
