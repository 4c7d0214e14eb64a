"""What every API takes, checked before any work: the server's limits, uploaded images (size-checked in bytes and
pixels before they are decoded), and one generation request turned into a queued ``Job``.

The three APIs (own, A1111, OpenAI) each translate their request into a ``GenerationInput``; ``make_job`` checks it
against the limits and the model (sampler, size multiples, settings) and raises ``BadInput`` naming the field, so a
bad request is answered 4xx at once and never reaches the worker.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import secrets
from dataclasses import dataclass

from PIL import Image

from latentdiff.diffusion.sampling import get_sampler
from latentdiff.diffusion.schedules import GRIDS
from latentdiff.edit_inputs import edit_strength, read_image, read_mask
from latentdiff.serve.queue import Job

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # what uploads may be


class BadInput(ValueError):
    """A request the server refuses: ``field`` names the offending field, ``status`` the HTTP status."""

    def __init__(self, field: str, message: str, status: int = 400):
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


@dataclass
class Limits:
    """What one request may ask for; checked before any work."""

    max_side: int = 1024  # pixels, width and height each
    max_pixels: int = 1024 * 1024  # width x height
    max_steps: int = 150  # sampler steps
    max_batch: int = 8  # images per request
    max_prompt_chars: int = 2000  # prompt and negative prompt, each
    max_upload_bytes: int = 8 * 2**20  # one uploaded image (decoded from base64), bytes
    max_upload_pixels: int = 1024 * 1024  # one uploaded image, pixels (read from its header, before decoding)

    def request_bytes(self) -> int:
        """The most bytes a request body may hold: two uploads in base64, plus the rest."""
        return 2 * (self.max_upload_bytes * 4 // 3 + 4) + 2**20


@dataclass
class GenerationInput:
    """One generation as every API describes it (None: the model's choice)."""

    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    sampler: str | None = None
    schedule: str | None = None
    guidance: float | None = None
    seed: int | None = None  # None or -1: a random seed, recorded
    num_images: int = 1
    image: Image.Image | None = None  # img2img / inpainting
    mask: Image.Image | None = None  # white repaints, black keeps (same size as image)
    strength: float | None = None
    previews: bool = False  # make preview images while sampling (they cost a decode each)


def b64_image(text: str, field: str, limits: Limits) -> Image.Image:
    """A base64 (or data: URL) image, refused by length before the base64 is decoded."""
    if not isinstance(text, str) or not text:
        raise BadInput(field, "expected a base64-encoded PNG or JPEG image")
    if text.startswith("data:"):
        text = text.partition(",")[2]
    if len(text) * 3 // 4 > limits.max_upload_bytes:
        raise BadInput(field, f"image is larger than {limits.max_upload_bytes} bytes", 413)
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadInput(field, "not valid base64") from None
    return image_bytes(data, field, limits)


def image_bytes(data: bytes, field: str, limits: Limits) -> Image.Image:
    """Uploaded bytes as a PIL image: byte count, then format and pixel size from the header, then decoded."""
    if len(data) > limits.max_upload_bytes:
        raise BadInput(field, f"image is larger than {limits.max_upload_bytes} bytes", 413)
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except (OSError, ValueError, Image.DecompressionBombError):
        raise BadInput(field, "not an image (expected PNG, JPEG or WebP)") from None
    if image.format not in IMAGE_FORMATS:
        raise BadInput(field, f"image format {image.format} is not accepted (expected PNG, JPEG or WebP)")
    w, h = image.size
    if w * h > limits.max_upload_pixels:
        raise BadInput(field, f"image is {w}x{h} pixels, more than {limits.max_upload_pixels}", 413)
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        raise BadInput(field, "the image data is damaged or truncated") from None
    return image


def make_job(pipe, inp: GenerationInput, limits: Limits, source: str) -> Job:
    """``inp`` checked against ``limits`` and the model, as a queued job; ``BadInput`` naming the field otherwise."""
    for name in ("prompt", "negative_prompt"):
        text = getattr(inp, name)
        if not isinstance(text, str):
            raise BadInput(name, "expected a string")
        if len(text) > limits.max_prompt_chars:
            raise BadInput(name, f"{len(text)} characters, more than the limit {limits.max_prompt_chars}")
    if not 1 <= inp.num_images <= limits.max_batch:
        raise BadInput("num_images", f"must be between 1 and {limits.max_batch}, got {inp.num_images}")
    if inp.steps is not None and not 1 <= inp.steps <= limits.max_steps:
        raise BadInput("steps", f"must be between 1 and {limits.max_steps}, got {inp.steps}")
    height, width = _size(pipe, inp, limits)
    if inp.sampler is not None:
        try:
            get_sampler(inp.sampler)
        except ValueError as e:
            raise BadInput("sampler", str(e)) from None
    if inp.schedule is not None and inp.schedule not in GRIDS:
        raise BadInput("schedule", f"unknown sigma grid {inp.schedule!r}: expected one of {', '.join(sorted(GRIDS))}")
    try:
        use = pipe.settings(sampler=inp.sampler, steps=inp.steps, guidance=inp.guidance, schedule=inp.schedule)
    except (ValueError, TypeError) as e:  # what is left: the guidance scale (finite)
        raise BadInput("guidance", str(e)) from None
    if use.steps > limits.max_steps:
        raise BadInput("steps", f"the model's default {use.steps} steps exceed the limit {limits.max_steps}")
    seed = secrets.randbelow(2**32) if inp.seed is None or inp.seed == -1 else inp.seed
    if not 0 <= seed < 2**64:
        raise BadInput("seed", f"must be -1 (random) or in [0, 2**64), got {seed}")
    kwargs = {"prompt": inp.prompt, "negative_prompt": inp.negative_prompt, "seed": seed, "height": height,
              "width": width, "num_images": inp.num_images, **dataclasses.asdict(use)}
    params = {**dataclasses.asdict(use), "prompt": inp.prompt, "negative_prompt": inp.negative_prompt, "seed": seed, "width": width,
              "height": height, "model": pipe.name, "num_images": inp.num_images, "api": source}
    total = use.steps
    if inp.image is not None:
        strength = _edit(inp, kwargs, height, width)
        params.update(strength=strength, edit="inpaint" if inp.mask is not None else "img2img")
        total = min(int(use.steps * strength), use.steps)
        if total < 1:
            raise BadInput("strength", f"strength {strength:g} of {use.steps} steps runs no step: raise it")
    elif inp.mask is not None or inp.strength is not None:
        name = "mask" if inp.mask is not None else "strength"
        raise BadInput(name, f"{name} edits an image: give the image too")
    try:  # the memory the request needs, against what is available; how many batches it runs in
        batch = pipe.batch_size(inp.num_images, height, width)
    except MemoryError as e:
        raise BadInput("num_images", str(e), 413) from None
    batches = -(-inp.num_images // batch)
    return Job(kwargs=kwargs, parameters=params, total=total * batches, batches=batches, watched=inp.previews)


def _size(pipe, inp: GenerationInput, limits: Limits) -> tuple[int, int]:
    """(height, width): asked, else the edit image's, else the model's; within the limits and the model's multiples."""
    size = inp.image.size if inp.image is not None else (pipe.default_size, pipe.default_size)
    width, height = inp.width or size[0], inp.height or size[1]
    for name, n in (("width", width), ("height", height)):
        if not 1 <= n <= limits.max_side:
            raise BadInput(name, f"must be between 1 and {limits.max_side} pixels, got {n}")
    if width * height > limits.max_pixels:
        raise BadInput("width", f"{width}x{height} is more than {limits.max_pixels} pixels")
    for name, n in (("width", width), ("height", height)):
        try:
            pipe.image_size(n, n)  # each side a multiple of the autoencoder's (and the network's) factor
        except ValueError as e:
            raise BadInput(name, str(e)) from None
    return height, width


def _edit(inp: GenerationInput, kwargs: dict, height: int, width: int) -> float:
    """The image (and mask) as ``generate`` keywords; their sizes checked. Returns the strength used."""
    if inp.image.size != (width, height):
        raise BadInput("image", f"the image is {inp.image.size[0]}x{inp.image.size[1]}, but {width}x{height} was asked "
                                "for: resize it, or leave width and height out")
    if inp.mask is not None and inp.mask.size != inp.image.size:
        raise BadInput("mask", f"the mask is {inp.mask.size[0]}x{inp.mask.size[1]}, the image "
                               f"{inp.image.size[0]}x{inp.image.size[1]}: they must be the same size")
    if inp.strength is not None and not 0 < inp.strength <= 1:
        raise BadInput("strength", f"must be in (0, 1], got {inp.strength}")
    strength = edit_strength(inp.strength, inp.mask is not None)
    kwargs.update(image=read_image(inp.image), strength=strength)
    if inp.mask is not None:
        kwargs["mask"] = read_mask(inp.mask)
    return strength
