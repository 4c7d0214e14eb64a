"""The OpenAI Images API subset (``/v1/images/generations``, ``/v1/images/edits``) that the ``openai`` client speaks.

``response_format`` "url" (the default, as for dall-e-2/3) links to this server's in-memory store; "b64_json" puts
the PNG in the answer. Sizes are "WIDTHxHEIGHT" (or "auto": the model's). Extra fields a client may send through
``extra_body``: negative_prompt, steps, sampler, guidance, seed, strength, and the own API's ``frames`` / ``fps``
(video models) and ``seconds`` (audio models). Edits follow OpenAI's mask convention: where the mask (or, without
one, the image) is transparent is repainted; a mask without alpha repaints white. A video model's clips are
animated WebPs, an audio model's clips WAVs, in the same envelope (``b64_json`` or ``url``); ``output_format``
("png", "webp", "wav") and ``media_type`` say which.
"""

from __future__ import annotations

import base64
import re
import time

from fastapi import APIRouter, HTTPException, Request
from PIL import Image
from pydantic import ConfigDict

from latentdiff.serve.common import MediaFields, file_of, finished, image_url, submit
from latentdiff.serve.inputs import BadInput, GenerationInput, image_bytes
from latentdiff.serve.queue import MEDIA_TYPES

FORMATS = ("url", "b64_json")


class GenerationsBody(MediaFields):
    """What we read of an OpenAI image generation request (other fields are ignored)."""

    model_config = ConfigDict(extra="ignore")
    prompt: str
    n: int | None = 1
    size: str | None = None
    response_format: str | None = "url"
    model: str | None = None
    negative_prompt: str = ""
    steps: int | None = None
    sampler: str | None = None
    guidance: float | None = None
    seed: int | None = None


def router() -> APIRouter:
    api = APIRouter(prefix="/v1/images", tags=["OpenAI-compatible"])

    @api.post("/generations", summary="Create images from a prompt (OpenAI)")
    async def generations(body: GenerationsBody, request: Request) -> dict:
        fmt = _format(body.response_format)
        width, height = _size(body.size)
        inp = GenerationInput(prompt=body.prompt, negative_prompt=body.negative_prompt, width=width, height=height,
                              steps=body.steps, sampler=body.sampler, guidance=body.guidance, seed=body.seed,
                              num_images=body.n or 1, **body.media())
        return await _run(request, inp, fmt)

    @api.post("/edits", summary="Edit an image: inpaint where the mask is transparent (OpenAI; multipart form)")
    async def edits(request: Request) -> dict:
        limits = request.app.state.limits
        form = await request.form(max_files=4, max_fields=64)
        fields = {k: v for k, v in form.items() if isinstance(v, str)}
        if "prompt" not in fields:
            raise BadInput("prompt", "a prompt is required")
        upload = form.get("image") or form.get("image[]")
        if upload is None or isinstance(upload, str):
            raise BadInput("image", "an image file is required (multipart field 'image')")
        image = image_bytes(await upload.read(limits.max_upload_bytes + 1), "image", limits)
        mask_upload = form.get("mask")
        mask = None
        if mask_upload is not None and not isinstance(mask_upload, str):
            mask = image_bytes(await mask_upload.read(limits.max_upload_bytes + 1), "mask", limits)
        width, height = _size(fields.get("size"))
        inp = GenerationInput(prompt=fields.get("prompt", ""), negative_prompt=fields.get("negative_prompt", ""),
                              width=width, height=height, steps=_int(fields, "steps"), sampler=fields.get("sampler"),
                              guidance=_number(fields, "guidance"), seed=_int(fields, "seed"),
                              num_images=_int(fields, "n") or 1, strength=_number(fields, "strength"))
        inp.image, inp.mask = image.convert("RGB"), _repaint_mask(image, mask)
        return await _run(request, inp, _format(fields.get("response_format")))

    return api


def _repaint_mask(image: Image.Image, mask: Image.Image | None) -> Image.Image | None:
    """OpenAI's convention as ours (white repaints): transparent pixels of the mask, else of the image."""
    source = mask if mask is not None else image
    if source.mode in ("RGBA", "LA") or "transparency" in source.info:
        alpha = source.convert("RGBA").getchannel("A")
        return alpha.point(lambda a: 255 if a < 128 else 0)
    return mask.convert("L") if mask is not None else None  # no alpha: img2img, or a black-and-white mask


def _format(value: str | None) -> str:
    fmt = value or "url"
    if fmt not in FORMATS:
        raise BadInput("response_format", f"must be one of {FORMATS}, got {fmt!r}")
    return fmt


def _size(value: str | None) -> tuple[int | None, int | None]:
    if value in (None, "", "auto"):
        return None, None
    match = re.fullmatch(r"\s*(\d{1,6})\s*x\s*(\d{1,6})\s*", value)
    if match is None:
        raise BadInput("size", f"expected WIDTHxHEIGHT such as 512x512, or 'auto', got {value!r}")
    return int(match[1]), int(match[2])


def _int(fields: dict, name: str) -> int | None:
    try:
        return int(fields[name]) if fields.get(name) not in (None, "") else None
    except ValueError:
        raise BadInput(name, f"expected a whole number, got {fields[name]!r}") from None


def _number(fields: dict, name: str) -> float | None:
    try:
        return float(fields[name]) if fields.get(name) not in (None, "") else None
    except ValueError:
        raise BadInput(name, f"expected a number, got {fields[name]!r}") from None


async def _run(request: Request, inp: GenerationInput, fmt: str) -> dict:
    try:
        job = submit(request, inp, "openai")
    except BadInput as e:
        if e.field not in ("width", "height"):
            raise
        raise BadInput("size", e.message, e.status) from None  # OpenAI's field for both
    job = await finished(job)
    if job.state != "done":
        raise HTTPException(500 if job.state == "failed" else 409, f"generation {job.state}: {job.error}")
    if fmt == "url":
        data = [{"url": image_url(request, t)} for t in job.images]
    else:
        data = [{"b64_json": base64.b64encode(file_of(request, t)).decode()} for t in job.images]
    suffix = job.images[0].rpartition(".")[2] if job.images else "png"  # webp: a video model's clips; wav: audio
    return {"created": int(time.time()), "data": data, "output_format": suffix, "media_type": MEDIA_TYPES["." + suffix]}
