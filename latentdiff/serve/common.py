"""What the three APIs share: the video / audio request fields, checking and queueing a request, waiting for it,
its files' URLs, error bodies."""

from __future__ import annotations

import asyncio

from fastapi import Request
from pydantic import BaseModel

from latentdiff.serve.inputs import GenerationInput, make_job
from latentdiff.serve.queue import Job


class MediaFields(BaseModel):
    """The own API's video and audio fields, which the compatible APIs take as extensions (checked by ``make_job``
    like the own API's: a field the model does not take is refused naming it)."""

    frames: int | None = None  # video models: frames per clip
    fps: float | None = None  # video models: frames per second of the animated WebP
    seconds: float | None = None  # audio models: clip length

    def media(self) -> dict:
        """The fields as ``GenerationInput`` keywords."""
        return {"frames": self.frames, "fps": self.fps, "seconds": self.seconds}


def submit(request: Request, inp: GenerationInput, source: str) -> Job:
    """Check ``inp`` and queue it (``BadInput`` / ``QueueFull`` otherwise)."""
    state = request.app.state
    return state.queue.submit(make_job(state.pipe, inp, state.limits, source))


async def finished(job: Job) -> Job:
    """Wait for ``job`` without holding a thread."""
    return await asyncio.shield(asyncio.wrap_future(job.future))  # a client leaving does not cancel the job


def image_url(request: Request, name: str) -> str:
    return str(request.url_for("image", name=name))


def file_of(request: Request, name: str) -> bytes:
    """A finished file's bytes (PNG, a video model's WebP, an audio model's WAV) by its store name."""
    return request.app.state.store.get(name) or b""


def error_body(request: Request, status: int, field_name: str, message: str) -> dict:
    """Our error shape, or OpenAI's under /v1 (its clients read ``error.message``)."""
    if request.url.path.startswith("/v1/"):
        return {"error": {"message": f"{field_name}: {message}", "type": "invalid_request_error",
                          "param": field_name, "code": status}}
    return {"detail": f"{field_name}: {message}", "field": field_name}
