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
import math
import secrets
from dataclasses import dataclass

from PIL import Image

from latentdiff.diffusion.sampling import get_sampler
from latentdiff.diffusion.schedules import GRIDS
from latentdiff.edit_inputs import edit_strength, read_image, read_mask
from latentdiff.serve.queue import Job

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")  # what uploads may be
MAX_FPS = 100.0  # a video clip's frames per second (WebP times frames in whole milliseconds)
DEFAULT_FPS = 8.0  # as `latentdiff generate --fps`


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
    frames: int | None = None  # video models: frames per clip (None: the model's clip length)
    fps: float | None = None  # video models: frames per second of the returned animated WebP (None: 8)
    seconds: float | None = None  # audio models: clip length (None: the model's)


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
    kind = model_kind(pipe)
    media, media_params = _media(pipe, inp, limits, kind)
    height, width = _size(pipe, inp, limits) if kind != "audio" else (None, None)
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
    size = {"height": height, "width": width} if kind != "audio" else {}
    kwargs = {"prompt": inp.prompt, "negative_prompt": inp.negative_prompt, "seed": seed, **size,
              "num_images": inp.num_images, **dataclasses.asdict(use), **media}
    params = {**dataclasses.asdict(use), "prompt": inp.prompt, "negative_prompt": inp.negative_prompt, "seed": seed,
              **size, "model": pipe.name, "num_images": inp.num_images, "api": source, **media_params}
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
    per = media.get("frames", 1)  # images per sample: a clip's frames
    if kind == "audio":
        height, width = pipe.index.audio.n_mels, media_params["mel_frames"]
    try:  # the memory the request needs, against what is available; how many batches it runs in (as generate)
        batch = max(1, pipe.batch_size(inp.num_images * per, height, width) // per)
    except MemoryError as e:
        raise BadInput("num_images", str(e), 413) from None
    batches = -(-inp.num_images // batch)
    return Job(kwargs=kwargs, parameters=params, total=total * batches, batches=batches, watched=inp.previews,
               kind=kind)


def model_kind(pipe) -> str:
    """What ``pipe`` makes: "audio" (``latentdiff train-audio``), "video" (``train-video``) or "image"."""
    if pipe.index.audio is not None:
        return "audio"
    return "video" if pipe.clip_length(None) is not None else "image"


def _media(pipe, inp: GenerationInput, limits: Limits, kind: str) -> tuple[dict, dict]:
    """A video or audio request's own fields, checked against the model: (``generate`` keywords, parameters)."""
    a = "an" if kind[0] in "aeiou" else "a"
    if inp.fps is not None and kind != "video":
        raise BadInput("fps", f"fps is for video models; {pipe.name!r} is {a} {kind} model")
    if inp.seconds is not None and kind != "audio":
        raise BadInput("seconds", f"seconds is for audio models; {pipe.name!r} is {a} {kind} model")
    if kind == "audio":
        return _audio(pipe, inp, limits)
    try:
        frames = pipe.clip_length(inp.frames)  # an image model refuses frames
    except ValueError as e:
        raise BadInput("frames", str(e)) from None
    if frames is None:
        return {}, {}
    if inp.image is not None or inp.mask is not None:
        raise BadInput("image" if inp.image is not None else "mask",
                       "a video model takes no image or mask (no video editing yet)")
    fps = DEFAULT_FPS if inp.fps is None else inp.fps
    if not (math.isfinite(fps) and 0 < fps <= MAX_FPS):
        raise BadInput("fps", f"must be a number in (0, {MAX_FPS:g}], got {fps}")
    return {"frames": frames}, {"frames": frames, "fps": fps}


def _audio(pipe, inp: GenerationInput, limits: Limits) -> tuple[dict, dict]:
    given = [name for name in ("frames", "width", "height", "image", "mask") if getattr(inp, name) is not None]
    if given:
        raise BadInput(given[0], "an audio model's clip size follows from seconds (and its mel bands); it takes "
                                 "no frames, width, height, image or mask")
    try:
        frames = pipe.audio_frames(inp.seconds)
    except ValueError as e:
        raise BadInput("seconds", str(e)) from None
    spec = pipe.index.audio
    if frames * spec.n_mels > limits.max_pixels:
        raise BadInput("seconds", f"{spec.seconds(frames):g} s is {frames} mel frames x {spec.n_mels} bands, more "
                                  f"than the server's {limits.max_pixels} pixels")
    return {"seconds": inp.seconds}, {"seconds": spec.seconds(frames), "sample_rate": spec.sample_rate,
                                      "mel_frames": frames}


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
