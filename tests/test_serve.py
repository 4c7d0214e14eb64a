"""``latentdiff serve``: the real clients (webuiapi for A1111, openai) against an in-process server on the bundled
default model; the queue (429, cancel, progress events), limits, bad input, the API key."""

import base64
import contextlib
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _serve import call, running

import latentdiff
from latentdiff.serve.app import ServeConfig
from latentdiff.serve.inputs import Limits

STEPS = 6


@pytest.fixture(scope="module")
def pipe():
    return latentdiff.load("default")


@pytest.fixture(scope="module")
def server(pipe):
    limits = Limits(max_side=256, max_pixels=256 * 256, max_steps=50, max_batch=4, max_prompt_chars=200,
                    max_upload_bytes=64 * 1024, max_upload_pixels=512 * 512)
    with running(pipe, ServeConfig(queue_size=8, limits=limits)) as (url, _):
        yield url


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(image: Image.Image) -> str:
    return base64.b64encode(png(image)).decode()


def test_webuiapi_txt2img_is_the_pipelines_image_and_carries_its_parameters(server, pipe):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(baseurl=f"{server}/sdapi/v1")
    result = api.txt2img(prompt="a large red circle", negative_prompt="blue", width=32, height=32, steps=STEPS,
                         seed=7, cfg_scale=4.0, sampler_name="DPM++ 2M Karras", batch_size=2)
    assert len(result.images) == 2 and result.images[0].size == (32, 32)
    assert result.info["seed"] == 7 and result.info["steps"] == STEPS
    direct = pipe.generate("a large red circle", negative_prompt="blue", height=32, width=32, steps=STEPS, seed=7,
                           guidance=4.0, sampler="DPM++ 2M Karras", num_images=2)
    for got, want in zip(result.images, direct):
        assert np.array_equal(np.asarray(got.convert("RGB")), np.asarray(want))
    params = json.loads(result.images[1].info["parameters"])
    assert params["prompt"] == "a large red circle" and params["seed"] == 7 and params["index"] == 1
    assert params["negative_prompt"] == "blue" and params["sampler"] == "DPM++ 2M Karras"


def test_webuiapi_img2img_with_mask_keeps_the_unmasked_pixels(server):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(baseurl=f"{server}/sdapi/v1")
    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    mask = np.zeros((32, 32), np.uint8)
    mask[:, :16] = 255  # repaint the left half
    result = api.img2img(images=[source], mask_image=Image.fromarray(mask), prompt="a green square", width=32,
                         height=32, steps=STEPS, seed=1, denoising_strength=1.0, sampler_name="Euler a")
    out = np.asarray(result.image.convert("RGB")).astype(int)
    assert np.array_equal(out[:, 16:], np.asarray(source)[:, 16:])  # kept exactly
    assert np.abs(out[:, :8] - np.asarray(source)[:, :8]).mean() > 20  # repainted
    plain = api.img2img(images=[source], prompt="a green square", width=32, height=32, steps=STEPS, seed=1,
                        denoising_strength=0.5)
    assert plain.image.size == (32, 32) and json.loads(plain.image.info["parameters"])["strength"] == 0.5


def test_webuiapi_lists_progress_interrupt_options(server, pipe):
    webuiapi = pytest.importorskip("webuiapi")
    api = webuiapi.WebUIApi(baseurl=f"{server}/sdapi/v1")
    samplers = {s["name"]: s["aliases"] for s in api.get_samplers()}
    assert samplers["Euler a"] == ["euler_ancestral"] and samplers["DPM++ 2M Karras"] == ["dpmpp_2m"]
    assert [m["model_name"] for m in api.get_sd_models()] == [pipe.name]
    assert api.get_options()["sd_model_checkpoint"] == pipe.name
    progress = api.get_progress()
    assert progress["state"]["job_count"] == 0 and progress["progress"] == 0.0
    assert api.interrupt() == {}
    status, _, _ = call(f"{server}/sdapi/v1/options", "POST", {"sd_model_checkpoint": "x"})
    assert status == 405  # read-only
    paths = call(f"{server}/openapi.json")[1]["paths"]  # the own API documented by FastAPI (/docs)
    assert {"/api/generate", "/api/jobs/{job_id}/events", "/sdapi/v1/txt2img", "/v1/images/edits"} <= set(paths)


def test_openai_generate_b64_and_url_and_edit(server):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    b64_result = client.images.generate(prompt="a small blue triangle", size="32x32", n=2,
                                        response_format="b64_json", extra_body={"seed": 3, "steps": STEPS})
    first = Image.open(io.BytesIO(base64.b64decode(b64_result.data[0].b64_json)))
    assert len(b64_result.data) == 2 and first.size == (32, 32)
    assert json.loads(first.info["parameters"])["prompt"] == "a small blue triangle"
    url_result = client.images.generate(prompt="a small blue triangle", size="32x32", response_format="url",
                                        extra_body={"seed": 3, "steps": STEPS})
    with urllib.request.urlopen(url_result.data[0].url, timeout=30) as r:
        linked = Image.open(io.BytesIO(r.read()))
    assert np.array_equal(np.asarray(linked.convert("RGB")), np.asarray(first.convert("RGB")))  # same seed

    source = first.convert("RGB")
    mask = np.full((32, 32, 4), 255, np.uint8)
    mask[16:, :, 3] = 0  # OpenAI: transparent = edit (the bottom half)
    edited = client.images.edit(image=("in.png", png(source), "image/png"),
                                mask=("mask.png", png(Image.fromarray(mask, "RGBA")), "image/png"),
                                prompt="a red circle", size="32x32", response_format="b64_json")
    out = np.asarray(Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))).convert("RGB"))
    assert np.array_equal(out[:16], np.asarray(source)[:16])


def test_own_api_events_carry_previews_then_the_result(server):
    status, job, _ = call(f"{server}/api/generate", "POST", {"prompt": "a red square", "steps": 8, "seed": 2,
                                                             "previews": True})
    assert status == 202, job
    events = []
    with urllib.request.urlopen(f"{server}/api/jobs/{job['id']}/events", timeout=60) as r:
        for block in r.read().decode().split("\n\n"):
            if block.strip():
                name = block.split("\n")[0].removeprefix("event: ")
                events.append((name, json.loads(block.split("data: ", 1)[1])))
    assert events[-1][0] == "done" and len(events[-1][1]["images"]) == 1
    previews = [data["preview"] for name, data in events if name == "progress" and "preview" in data]
    assert previews, "no preview image in the progress events"
    preview = Image.open(io.BytesIO(base64.b64decode(previews[-1].split(",", 1)[1])))
    assert preview.size == (32, 32)
    _, data, _ = call(events[-1][1]["images"][0])
    assert json.loads(Image.open(io.BytesIO(data)).info["parameters"])["seed"] == 2


@pytest.mark.parametrize("path, body, field, code", [
    ("/api/generate", {"prompt": "x", "steps": "many"}, "steps", 422),
    ("/api/generate", {"prompt": "x", "sampler": "no_such_sampler"}, "sampler", 400),
    ("/api/generate", {"prompt": "x", "schedule": "wobbly"}, "schedule", 400),
    ("/api/generate", {"prompt": "x", "guidance": float("nan")}, "guidance", 400),
    ("/api/generate", {"prompt": "x", "strength": 0.5}, "strength", 400),
    ("/api/generate", {"prompt": "x", "width": 30}, "width", 400),
    ("/api/generate", {"prompt": "x", "width": 4096}, "width", 400),
    ("/api/generate", {"prompt": "x", "steps": 51}, "steps", 400),
    ("/api/generate", {"prompt": "x", "num_images": 5}, "num_images", 400),
    ("/api/generate", {"prompt": "x" * 201}, "prompt", 400),
    ("/api/generate", {"prompt": "x", "colour": "red"}, "colour", 422),
    ("/api/generate", {"prompt": "x", "image": base64.b64encode(b"not an image").decode()}, "image", 400),
    ("/api/generate", {"prompt": "x", "image": "@@@"}, "image", 400),
    ("/api/generate", {"prompt": "x", "image": "A" * 200_000}, "image", 413),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 32, "height": 32, "sampler_name": "Eulr"}, "sampler", 400),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 32, "height": 36}, "height", 400),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, "size", 400),
    ("/v1/images/generations", {"prompt": "x", "response_format": "gif"}, "response_format", 400),
])
def test_bad_input_is_refused_naming_the_field(server, path, body, field, code):
    status, answer, _ = call(server + path, "POST", body)
    assert status == code, answer
    text = answer["error"]["message"] if path.startswith("/v1/") else answer["detail"]
    assert text.startswith(f"{field}:") or field in text, text


def test_malformed_uploads_and_the_server_keeps_serving(server):
    status, answer, _ = call(f"{server}/api/generate", "POST", raw=b'{"prompt": "x", ')
    assert status == 422 and "body" in answer["detail"] or "json" in answer["detail"].lower(), answer
    image = Image.new("RGB", (32, 32), (200, 10, 10))
    body = {"prompt": "x", "image": b64(image), "mask": b64(Image.new("L", (16, 32), 255))}
    status, answer, _ = call(f"{server}/api/generate", "POST", body)
    assert status == 400 and answer["field"] == "mask", answer
    big = Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8))  # 120 kB
    status, answer, _ = call(f"{server}/sdapi/v1/img2img", "POST",
                             {"init_images": [b64(big)], "prompt": "x", "width": 32, "height": 32})
    assert status == 413 and answer["field"] == "init_images", answer
    wide = Image.new("RGB", (1024, 300))  # few bytes, too many pixels: refused from its header
    status, answer, _ = call(f"{server}/api/generate", "POST", {"prompt": "x", "image": b64(wide)})
    assert status == 413 and "pixels" in answer["detail"], answer
    host, port = server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:  # a huge body announced: refused unread
        s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000000\r\n\r\n")
        assert s.recv(1000).split(b"\r\n")[0].endswith(b"413 Request Entity Too Large")
    with socket.create_connection((host, int(port)), timeout=30) as s:  # chunked, no length: counted as it comes
        s.sendall(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b'{"prompt": "' + b"x" * 50_000
        with contextlib.suppress(OSError):  # the server may stop reading once it has answered
            for _ in range(60):
                s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        assert s.recv(1000).split(b"\r\n")[0].endswith(b"413 Request Entity Too Large")
    boundary = "b0undary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nx\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\nGIF89a not a png\r\n--{boundary}--\r\n").encode()
    status, answer, _ = call(f"{server}/v1/images/edits", "POST", raw=form,
                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 400 and answer["error"]["param"] == "image", answer
    status, answer, _ = call(f"{server}/api/generate?wait=true", "POST", {"prompt": "still here", "steps": 2})
    assert status == 202 and answer["state"] == "done", answer


class Gated:
    """The pipeline, with generate() held until the test opens the gate (a busy worker, on demand)."""

    def __init__(self, pipe):
        self._pipe, self.gate = pipe, threading.Event()

    def __getattr__(self, name):
        return getattr(self._pipe, name)

    def generate(self, *args, **kw):
        assert self.gate.wait(60)
        return self._pipe.generate(*args, **kw)


def test_queue_is_bounded_cancels_and_drains(pipe):
    gated = Gated(pipe)
    with running(gated, ServeConfig(queue_size=2)) as (url, app):
        jobs = [call(f"{url}/api/generate", "POST", {"prompt": "x", "steps": 2, "seed": i})[1] for i in range(3)]
        assert all(j["state"] in ("queued", "running") for j in jobs)  # one running + two waiting
        status, answer, headers = call(f"{url}/api/generate", "POST", {"prompt": "x", "steps": 2})
        assert status == 429 and int(headers["Retry-After"]) >= 1, answer
        status, _, _ = call(f"{url}/sdapi/v1/txt2img", "POST", {"prompt": "x", "width": 32, "height": 32})
        assert status == 429
        _, cancelled, _ = call(f"{url}/api/jobs/{jobs[2]['id']}/cancel", "POST")
        assert cancelled["state"] == "cancelled"
        gated.gate.set()
        for job in jobs[:2]:
            job["future"] = app.state.queue.jobs[job["id"]].future.result(timeout=60)
        assert [call(f"{url}/api/jobs/{j['id']}")[1]["state"] for j in jobs] == ["done", "done", "cancelled"]
        _, answer, _ = call(f"{url}/api/generate?wait=true", "POST", {"prompt": "x", "steps": 40})
        assert answer["state"] == "done"


def test_running_job_reports_progress_and_stops_on_interrupt(pipe):
    webuiapi = pytest.importorskip("webuiapi")
    with running(pipe, ServeConfig()) as (url, app):
        _, job, _ = call(f"{url}/api/generate", "POST", {"prompt": "x", "steps": 50, "num_images": 4})
        live = app.state.queue.jobs[job["id"]]
        api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1")
        progress = api.get_progress()  # asks for previews from now on
        while live.preview is None and live.state == "running":
            time.sleep(0.01)
        progress = api.get_progress()
        assert progress["state"]["job"] == live.id and 0 < progress["progress"] < 1, progress
        assert progress["state"]["sampling_steps"] == 50
        assert Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).size == (32, 32)
        api.interrupt()
        live.future.result(timeout=60)
        assert live.state == "cancelled" and live.step < 50 and not live.images
        assert api.get_progress()["state"]["job_count"] == 0


class Failing(Gated):
    """The pipeline, failing inside generate() for the prompt "boom" (an error only the work finds)."""

    def generate(self, *args, **kw):
        if kw.get("prompt") == "boom":
            raise RuntimeError("sampling gave non-finite latents")
        return self._pipe.generate(*args, **kw)


def test_a_failed_job_reports_its_error_and_the_worker_goes_on(pipe):
    with running(Failing(pipe), ServeConfig()) as (url, _):
        _, answer, _ = call(f"{url}/api/generate?wait=true", "POST", {"prompt": "boom", "steps": 2})
        assert answer["state"] == "failed" and "non-finite" in answer["error"]
        status, answer, _ = call(f"{url}/sdapi/v1/txt2img", "POST", {"prompt": "boom", "width": 32, "height": 32})
        assert status == 500 and "non-finite" in answer["detail"]
        _, answer, _ = call(f"{url}/api/generate?wait=true", "POST", {"prompt": "fine", "steps": 2})
        assert answer["state"] == "done"


def test_api_key_is_asked_of_every_api(pipe):
    webuiapi = pytest.importorskip("webuiapi")
    openai = pytest.importorskip("openai")
    with running(pipe, ServeConfig(api_key="s3cret")) as (url, _):
        assert call(f"{url}/api/info")[0] == 401
        assert call(f"{url}/sdapi/v1/samplers")[0] == 401
        assert call(f"{url}/api/info", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(f"{url}/api/info", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert call(f"{url}/api/info", headers={"X-API-Key": "s3cret"})[0] == 200
        assert call(f"{url}/")[0] == 200  # the page itself asks for the key
        api = webuiapi.WebUIApi(baseurl=f"{url}/sdapi/v1", username="me", password="s3cret")
        assert api.txt2img(prompt="x", width=32, height=32, steps=2).image.size == (32, 32)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        assert len(client.images.generate(prompt="x", size="32x32", extra_body={"steps": 2}).data) == 1
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).images.generate(prompt="x")


def test_any_model_folder_is_served_with_its_own_size_rules(tmp_path):
    from _tiny import tiny_model_folder

    pipe = latentdiff.load(tiny_model_folder(tmp_path / "tiny", size=16))  # factor-2 autoencoder, 2-level U-Net
    with running(pipe, ServeConfig()) as (url, _):
        info = call(f"{url}/api/info")[1]
        assert (info["model"], info["default_size"], info["size_multiple"]) == ("tiny", 16, 4)
        status, answer, _ = call(f"{url}/api/generate", "POST", {"prompt": "x", "width": 18})
        assert status == 400 and answer["field"] == "width" and "multiples of 4" in answer["detail"], answer
        _, answer, _ = call(f"{url}/api/generate?wait=true", "POST", {"prompt": "x", "width": 24, "steps": 3})
        assert answer["state"] == "done" and answer["parameters"]["width"] == 24
        assert Image.open(io.BytesIO(call(answer["images"][0])[1])).size == (24, 16)


def test_serve_command_parses():
    from latentdiff.cli import build_parser

    args = build_parser().parse_args(["serve", "--port", "8000", "--max-steps", "30", "--queue-size", "0"])
    assert args.port == 8000 and args.max_steps == 30 and args.queue_size == 0 and args.model == "default"


def test_serve_command_refuses_bad_limits_before_loading(capsys):
    from latentdiff.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--max-steps", "0", "--model", "/nonexistent"])
    assert exit_info.value.code == 2 and "--max-steps must be positive" in capsys.readouterr().err

