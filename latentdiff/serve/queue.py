"""A bounded job queue with one generation worker thread, per-job progress and cancel, and the in-memory, bounded
store of finished files the API links to: PNGs (image models), animated WebPs (video), WAVs (audio).

The CPU is the bottleneck, so one worker runs one ``Pipeline.generate`` at a time; at most ``max_waiting`` jobs
wait behind it, and ``submit`` refuses the next one at once (``QueueFull``, with a Retry-After estimate) instead of
letting requests pile up in memory.
"""

from __future__ import annotations

import collections
import concurrent.futures
import secrets
import threading
import time
from dataclasses import dataclass, field

from latentdiff.audio import wav_bytes
from latentdiff.images import png_bytes, to_pil, webp_bytes

MEDIA_TYPES = {".png": "image/png", ".webp": "image/webp", ".wav": "audio/wav"}  # what the store holds, by suffix
PREVIEW_MAX_PIXELS = 256 * 256  # without a preview decoder, previews are decoded by the autoencoder up to this size


class QueueFull(Exception):
    """More jobs than the queue holds; ``retry_after`` seconds is a guess of when one slot frees."""

    def __init__(self, retry_after: int):
        super().__init__(f"the server is busy (queue full); retry after {retry_after} s")
        self.retry_after = retry_after


class Cancelled(Exception):
    """Raised inside the sampler's callback when a running job is cancelled."""


@dataclass
class Job:
    """One generation: the keywords of ``Pipeline.generate``, what its files record, and its state."""

    kwargs: dict  # Pipeline.generate (generate_audio) keywords (prompt, steps, sampler, image, mask, frames, ...)
    parameters: dict  # written into every PNG / WebP / WAV (per file: + prompt, index)
    total: int  # sampler steps the job runs, all its batches together (progress denominator)
    batches: int = 1  # Pipeline.generate's batches (each runs the whole grid)
    kind: str = "image"  # the model's: "image" (PNGs), "video" (animated WebPs), "audio" (WAVs)
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    state: str = "queued"  # queued -> running -> done | failed | cancelled
    step: int = 0  # sampler steps done
    preview: bytes | None = None  # the latest preview, PNG
    error: str = ""  # what went wrong (failed)
    images: list = field(default_factory=list)  # store names of the files (done): token + suffix
    created: float = field(default_factory=time.time)
    started: float = 0.0
    finished: float = 0.0
    cancel_requested: bool = False
    watched: bool = False  # someone wants previews (asked for them, follows the events, polls A1111 progress)
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future, repr=False)
    version: int = 0  # bumped on every change, for event streams

    def status(self) -> dict:
        """What the API says about the job (no image bytes)."""
        return {"id": self.id, "state": self.state, "step": self.step, "total": self.total, "error": self.error,
                "images": list(self.images), "parameters": self.parameters}


class ImageStore:
    """Finished files by name: a random token (a capability URL) + the suffix saying what the file is
    (``MEDIA_TYPES``); the oldest dropped beyond ``max_images`` or ``max_bytes``."""

    def __init__(self, max_images: int = 256, max_bytes: int = 256 * 2**20):
        self.max_images, self.max_bytes = max_images, max_bytes
        self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def put(self, data: bytes, suffix: str = ".png") -> str:
        if suffix not in MEDIA_TYPES:
            raise ValueError(f"the store holds {', '.join(MEDIA_TYPES)} files, not {suffix!r}")
        token = secrets.token_urlsafe(16) + suffix
        with self._lock:
            self._items[token] = data
            self._bytes += len(data)
            while len(self._items) > 1 and (len(self._items) > self.max_images or self._bytes > self.max_bytes):
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)
        return token

    def get(self, token: str) -> bytes | None:
        with self._lock:
            return self._items.get(token)

    def __len__(self) -> int:
        return len(self._items)


class JobQueue:
    """``max_waiting`` queued jobs at most, run one at a time by one worker thread over ``pipe``."""

    def __init__(self, pipe, store: ImageStore, max_waiting: int = 4, keep_jobs: int = 256, previews: int = 8):
        self.pipe, self.store = pipe, store
        self.max_waiting, self.keep_jobs, self.previews = max_waiting, keep_jobs, previews
        self.jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()  # recent jobs, by id
        self.current: Job | None = None
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._seconds_per_step = 0.05  # running estimate, for Retry-After
        self._stop = False
        self._worker = threading.Thread(target=self._run, name="latentdiff-generate", daemon=True)
        self._worker.start()

    # -- the API side ------------------------------------------------------------------------------------------
    def submit(self, job: Job) -> Job:
        """Queue ``job``, or raise ``QueueFull`` at once."""
        with self._cond:
            if len(self._waiting) + (self.current is not None) > self.max_waiting:  # the worker's job, and waiting
                left = self.current.total - self.current.step if self.current else 1  # a slot frees when it ends
                raise QueueFull(max(1, round(left * self._seconds_per_step)))
            self._waiting.append(job)
            self.jobs[job.id] = job
            finished = [i for i, j in self.jobs.items() if j.state in ("done", "failed", "cancelled")]
            for i in finished[:max(0, len(self.jobs) - self.keep_jobs)]:
                del self.jobs[i]
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """A queued job is dropped; a running one stops at its next sampler step."""
        with self._cond:
            job.cancel_requested = True
            if job in self._waiting:
                self._waiting.remove(job)
                self._finish(job, "cancelled")

    def waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            for job in list(self._waiting):
                self._finish(job, "cancelled")
            self._waiting.clear()
            if self.current is not None:
                self.current.cancel_requested = True
            self._cond.notify_all()
        self._worker.join(timeout=30)

    # -- the worker ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return
                job = self.current = self._waiting.popleft()
                job.state, job.started, job.version = "running", time.time(), job.version + 1
            state = "done"
            try:
                make = self.pipe.generate_audio if job.kind == "audio" else self.pipe.generate
                self._store(job, make(**job.kwargs, callback=self._callback(job)))
            except Cancelled:
                state = "cancelled"
            except Exception as e:  # noqa: BLE001 -- a failed job reports its error; the worker keeps serving
                job.error, state = " ".join(str(e).split()) or type(e).__name__, "failed"
            with self._cond:
                self.current = None  # before the job is seen finished, so progress never shows it after
            self._finish(job, state)
            if job.step:
                took = (job.finished - job.started) / job.step
                self._seconds_per_step = 0.8 * self._seconds_per_step + 0.2 * took

    def _callback(self, job: Job):
        per_batch = job.total // job.batches
        every = max(1, per_batch // self.previews) if self.previews else 0
        batch = {"base": 0, "last": -1}

        def report(info: dict) -> None:
            if job.cancel_requested or self._stop:
                raise Cancelled
            i = info["i"]  # the step within this batch's grid
            if i <= batch["last"]:  # the next batch began
                batch["base"] += per_batch
            batch["last"] = i
            job.step = min(batch["base"] + i + 1, job.total)
            if every and job.watched and (i % every == 0 or i + 1 == per_batch):
                job.preview = self._preview(info["denoised"])
            job.version += 1

        return report

    def _preview(self, denoised) -> bytes | None:
        """The current estimate, small: the preview decoder's image, else the autoencoder's for small images; a
        clip's first frame; a mel spectrogram with low frequencies at the bottom."""
        if denoised.ndim == 5:  # a video model's (B, C, F, h, w)
            denoised = denoised[:, :, 0]
        decoder = self.pipe.preview_decoder
        if decoder is None:
            factor = self.pipe.autoencoder.factor
            if denoised.shape[-1] * denoised.shape[-2] * factor * factor > PREVIEW_MAX_PIXELS:
                return None
            decoder = self.pipe.autoencoder.decode
        import torch

        with torch.no_grad():
            image = decoder(denoised[:1].float())
        return png_bytes(to_pil(image.flip(-2) if image.shape[1] == 1 else image)[0])

    def _store(self, job: Job, result) -> None:
        """PNGs (images), animated WebPs (clips: lists of frames), WAVs (audio: waveforms, mel spectrograms)."""
        items = result[0] if job.kind == "audio" else result  # audio: (waveforms, mel spectrograms)
        prompts = job.kwargs["prompt"] if isinstance(job.kwargs["prompt"], list) else [job.kwargs["prompt"]]
        per_prompt = len(items) // len(prompts)
        for i, item in enumerate(items):
            params = {**job.parameters, "prompt": prompts[i // per_prompt], "index": i}
            if job.kind == "audio":
                job.images.append(self.store.put(wav_bytes(item, job.parameters["sample_rate"], params), ".wav"))
            elif job.kind == "video":
                job.images.append(self.store.put(webp_bytes(item, job.parameters["fps"], params), ".webp"))
            else:
                job.images.append(self.store.put(png_bytes(item, params)))

    def _finish(self, job: Job, state: str) -> None:
        job.kwargs.pop("image", None), job.kwargs.pop("mask", None)  # kept jobs hold no decoded uploads
        job.state, job.finished, job.version = state, time.time(), job.version + 1
        if not job.future.done():
            job.future.set_result(job)
