"""``latentdiff serve`` over a video model (clips as lossless animated WebPs, ``frames`` / ``fps``) and an audio model
(WAVs, ``seconds``), through the own API and the A1111 / OpenAI ones: the files are the pipeline's own output, their
parameters travel with them, and bad requests are refused naming the field before any work."""

import base64
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageSequence

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from _serve import call, running
from _tiny import tiny_audio_model, tiny_model_folder, train_video

from latentdiff.audio import read_wav, read_wav_parameters
from latentdiff.images import read_parameters
from latentdiff.pipeline import load
from latentdiff.serve.app import ServeConfig

CLIP = "a small red circle moving to the right on a black background"
TONE = "a piano note C5 played twice"


@pytest.fixture(scope="module")
def image_model(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("image") / "model")


@pytest.fixture(scope="module")
def video(image_model, tmp_path_factory):
    pipe = load(train_video(image_model, tmp_path_factory.mktemp("video") / "run"))
    with running(pipe, ServeConfig()) as (url, app):
        yield pipe, url, app


@pytest.fixture(scope="module")
def audio(tmp_path_factory):
    pipe = load(tiny_audio_model(tmp_path_factory.mktemp("audio")))
    with running(pipe, ServeConfig()) as (url, app):
        yield pipe, url, app


def frames_of(data: bytes) -> tuple[Image.Image, list[np.ndarray]]:
    clip = Image.open(io.BytesIO(data))
    return clip, [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(clip)]


def test_video_clips_are_the_pipelines_frames_as_lossless_webps(video):
    pipe, url, _ = video
    status, job, _ = call(f"{url}/api/generate?wait=true", "POST",
                          {"prompt": CLIP, "steps": 2, "seed": 4, "frames": 3, "fps": 5, "num_images": 2})
    assert status == 202 and job["state"] == "done", job
    assert job["parameters"]["frames"] == 3 and job["parameters"]["fps"] == 5
    want = pipe.generate(CLIP, steps=2, seed=4, frames=3, num_images=2)
    assert len(job["images"]) == 2
    for i, (link, clip) in enumerate(zip(job["images"], want)):
        status, data, headers = call(link)
        assert status == 200 and headers["Content-Type"] == "image/webp" and link.endswith(".webp")
        image, frames = frames_of(data)
        assert image.format == "WEBP" and image.n_frames == 3 and image.size == (16, 16)
        assert image.info["duration"] == 200  # 5 fps
        for got, frame in zip(frames, clip):
            assert np.array_equal(got, np.asarray(frame))  # lossless: the pipeline's pixels exactly
        params = read_parameters(io.BytesIO(data))
        assert (params["prompt"], params["index"], params["seed"], params["frames"]) == (CLIP, i, 4, 3)


def test_video_defaults_info_previews_and_the_compatible_apis(video):
    _, url, app = video
    info = call(f"{url}/api/info")[1]
    assert (info["kind"], info["frames"], info["max_frames"], info["fps"]) == ("video", 4, 16, 8.0)
    _, job, _ = call(f"{url}/api/generate?wait=true", "POST", {"prompt": CLIP, "steps": 2, "previews": True})
    image, _ = frames_of(call(job["images"][0])[1])
    assert image.n_frames == 4 and job["parameters"]["fps"] == 8.0  # the model's clip length, 8 fps
    preview = app.state.queue.jobs[job["id"]].preview  # a clip's first frame, decoded while sampling
    assert Image.open(io.BytesIO(preview)).size == (16, 16)
    status, answer, _ = call(f"{url}/v1/images/generations", "POST",
                             {"prompt": CLIP, "response_format": "b64_json", "steps": 2})
    assert status == 200 and answer["output_format"] == "webp", answer
    assert Image.open(io.BytesIO(base64.b64decode(answer["data"][0]["b64_json"]))).n_frames == 4
    status, answer, _ = call(f"{url}/sdapi/v1/txt2img", "POST", {"prompt": CLIP, "width": 16, "height": 16,
                                                                   "steps": 2})
    assert status == 200 and Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).n_frames == 4


@pytest.mark.parametrize("body, field, words", [
    ({"frames": 17}, "frames", "1 to 16 frames"),
    ({"frames": 0}, "frames", "1 to 16 frames"),
    ({"fps": 0}, "fps", "(0, 100]"),
    ({"fps": 1000}, "fps", "(0, 100]"),
    ({"seconds": 1.0}, "seconds", "audio models"),
])
def test_video_refuses_bad_requests_before_any_work(video, body, field, words):
    _, url, app = video
    jobs = len(app.state.queue.jobs)
    status, answer, _ = call(f"{url}/api/generate", "POST", {"prompt": CLIP, **body})
    assert status == 400 and answer["field"] == field and words in answer["detail"], answer
    assert len(app.state.queue.jobs) == jobs  # nothing queued


def test_video_refuses_an_edit(video):
    _, url, _ = video
    png = io.BytesIO()
    Image.new("RGB", (16, 16)).save(png, format="PNG")
    status, answer, _ = call(f"{url}/api/generate", "POST",
                             {"prompt": CLIP, "image": base64.b64encode(png.getvalue()).decode()})
    assert status == 400 and answer["field"] == "image" and "no video editing" in answer["detail"], answer


def test_an_image_model_refuses_frames_fps_and_seconds(image_model):
    with running(load(image_model), ServeConfig()) as (url, app):
        assert call(f"{url}/api/info")[1]["kind"] == "image"
        for body, field, words in [({"frames": 4}, "frames", "is an image model"),
                                   ({"fps": 8}, "fps", "video models"),
                                   ({"seconds": 1.0}, "seconds", "audio models")]:
            for path in ("/api/generate", "/sdapi/v1/txt2img", "/v1/images/generations"):
                refused((None, url, app), path, {"prompt": "x", **body}, field, words)
        refused((None, url, app), "/v1/images/generations", {"prompt": "x", "size": "18x16"}, "size", "multiples of")
        assert not app.state.queue.jobs


def test_audio_clips_are_the_pipelines_waveforms_as_wavs(audio):
    pipe, url, app = audio
    info = call(f"{url}/api/info")[1]
    assert (info["kind"], info["seconds"], info["sample_rate"]) == ("audio", 0.256, 16000)
    status, job, _ = call(f"{url}/api/generate?wait=true", "POST",
                          {"prompt": TONE, "steps": 2, "seed": 3, "num_images": 2, "seconds": 0.512,
                           "previews": True})
    assert status == 202 and job["state"] == "done", job
    assert (job["parameters"]["seconds"], job["parameters"]["sample_rate"]) == (0.512, 16000)
    waves, _ = pipe.generate_audio(TONE, steps=2, seed=3, num_images=2, seconds=0.512)
    for i, (link, want) in enumerate(zip(job["images"], waves)):
        status, data, headers = call(link)
        assert status == 200 and headers["Content-Type"] == "audio/wav" and link.endswith(".wav")
        got, rate = read_wav(io.BytesIO(data))
        assert read_wav_parameters(data) == {**job["parameters"], "prompt": TONE, "index": i}
        assert rate == 16000 and got.shape == (32 * 256,)
        # 16-bit PCM: within one step (the server's worker thread may round a sample the other way; CI saw 1 of 8192)
        np.testing.assert_allclose(got, np.round(want.numpy() * 32767) / 32767, atol=1.01 / 32767, rtol=0)
        assert np.mean(np.abs(got - want.numpy()) <= 0.5 / 32767 + 1e-7) > 0.99  # nearly all exactly the rounding
    preview = app.state.queue.jobs[job["id"]].preview  # the mel spectrogram, decoded while sampling
    assert Image.open(io.BytesIO(preview)).size == (32, 16)


@pytest.mark.parametrize("path, body, field, words, code", [
    ("/api/generate", {"seconds": 0.5}, "seconds", "try 0.512 s", 400),
    ("/api/generate", {"seconds": -1}, "seconds", "must be in (0, 600]", 400),
    ("/api/generate", {"seconds": 700}, "seconds", "must be in (0, 600]", 400),
    ("/api/generate", {"width": 16}, "width", "follows from seconds", 400),
    ("/api/generate", {"frames": 4}, "frames", "follows from seconds", 400),
    ("/api/generate", {"fps": 8}, "fps", "video models", 400),
    ("/sdapi/v1/txt2img", {"seconds": 0.5}, "seconds", "try 0.512 s", 400),
    ("/sdapi/v1/txt2img", {"width": 512}, "width", "follows from seconds", 400),  # given, not A1111's default
    ("/sdapi/v1/txt2img", {"fps": 8}, "fps", "video models", 400),
    ("/v1/images/generations", {"seconds": 700}, "seconds", "must be in (0, 600]", 400),
    ("/v1/images/generations", {"size": "16x16"}, "size", "follows from seconds", 400),
    ("/v1/images/generations", {"frames": 4}, "frames", "follows from seconds", 400),
])
def test_audio_refuses_bad_requests_before_any_work(audio, path, body, field, words, code):
    refused(audio, path, {"prompt": TONE, **body}, field, words, code)


def refused(served, path, body, field, words, code=400):
    """``body`` answered ``code`` naming ``field`` (in each API's error shape), and nothing queued."""
    _, url, app = served
    jobs = len(app.state.queue.jobs)
    status, answer, _ = call(url + path, "POST", body)
    if path.startswith("/v1/"):
        text, named = answer["error"]["message"], answer["error"]["param"]
    else:
        text, named = answer["detail"], answer["field"]
    assert status == code and named == field and words in text, answer
    assert len(app.state.queue.jobs) == jobs


def test_audio_through_the_compatible_apis(audio):
    _, url, _ = audio
    body = {"prompt": TONE, "steps": 2, "seed": 5, "seconds": 0.512}
    status, answer, _ = call(f"{url}/v1/images/generations", "POST",
                             {**body, "guidance": 2.0, "response_format": "b64_json"})
    assert status == 200 and (answer["output_format"], answer["media_type"]) == ("wav", "audio/wav"), answer
    openai = base64.b64decode(answer["data"][0]["b64_json"])
    status, answer, _ = call(f"{url}/sdapi/v1/txt2img", "POST", {**body, "cfg_scale": 2.0})  # A1111's 512 x 512 default: not a size given
    assert status == 200 and json.loads(answer["info"])["width"] is None, answer
    a1111 = base64.b64decode(answer["images"][0])
    for data, api in [(openai, "openai"), (a1111, "a1111")]:
        got, rate = read_wav(io.BytesIO(data))
        assert rate == 16000 and got.shape == (32 * 256,)
        params = read_wav_parameters(data)
        assert (params["api"], params["seconds"], params["seed"], params["prompt"]) == (api, 0.512, 5, TONE)
    assert np.array_equal(read_wav(io.BytesIO(openai))[0], read_wav(io.BytesIO(a1111))[0])  # the same clip
    status, answer, _ = call(f"{url}/v1/images/generations", "POST", {**body, "seconds": None})
    link = answer["data"][0]["url"]
    status, data, headers = call(link)
    assert link.endswith(".wav") and headers["Content-Type"] == "audio/wav"
    assert read_wav(io.BytesIO(data))[0].shape == (16 * 256,)  # the model's 0.256 s
    assert call(f"{url}/sdapi/v1/options")[1]["samples_format"] == "wav"


def test_the_openai_client_gets_a_wav_through_extra_body(audio):
    openai = pytest.importorskip("openai")
    _, url, _ = audio
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    answer = client.images.generate(prompt=TONE, response_format="b64_json",
                                    extra_body={"steps": 2, "seed": 1, "seconds": 0.512})
    assert answer.output_format == "wav"
    data = base64.b64decode(answer.data[0].b64_json)
    assert read_wav(io.BytesIO(data))[0].shape == (32 * 256,) and read_wav_parameters(data)["seconds"] == 0.512
    with pytest.raises(openai.BadRequestError, match="frames"):
        client.images.generate(prompt=TONE, extra_body={"frames": 4})


def test_video_frames_and_fps_through_the_compatible_apis(video):
    _, url, _ = video
    status, answer, _ = call(f"{url}/v1/images/generations", "POST",
                             {"prompt": CLIP, "response_format": "b64_json", "steps": 2, "seed": 4, "frames": 3,
                              "fps": 5, "guidance": 2.0})
    assert status == 200 and (answer["output_format"], answer["media_type"]) == ("webp", "image/webp"), answer
    openai = base64.b64decode(answer["data"][0]["b64_json"])
    status, answer, _ = call(f"{url}/sdapi/v1/txt2img", "POST", {"prompt": CLIP, "width": 16, "height": 16,
                                                                   "steps": 2, "seed": 4, "frames": 3, "fps": 5,
                                                                   "cfg_scale": 2.0})
    assert status == 200, answer
    a1111 = base64.b64decode(answer["images"][0])
    for data, api in [(openai, "openai"), (a1111, "a1111")]:
        clip, _ = frames_of(data)
        assert clip.n_frames == 3 and clip.info["duration"] == 200  # 5 fps
        params = read_parameters(io.BytesIO(data))
        assert (params["api"], params["frames"], params["fps"]) == (api, 3, 5)
    assert all(np.array_equal(a, b) for a, b in zip(frames_of(openai)[1], frames_of(a1111)[1]))


@pytest.mark.parametrize("path, body, field, words", [
    ("/v1/images/generations", {"frames": 17}, "frames", "1 to 16 frames"),
    ("/v1/images/generations", {"fps": 0}, "fps", "(0, 100]"),
    ("/v1/images/generations", {"seconds": 1.0}, "seconds", "audio models"),
    ("/sdapi/v1/txt2img", {"frames": 0, "width": 16, "height": 16}, "frames", "1 to 16 frames"),
    ("/sdapi/v1/txt2img", {"fps": 1000, "width": 16, "height": 16}, "fps", "(0, 100]"),
    ("/sdapi/v1/txt2img", {"seconds": 1.0, "width": 16, "height": 16}, "seconds", "audio models"),
])
def test_video_compatible_apis_refuse_bad_requests_before_any_work(video, path, body, field, words):
    refused(video, path, {"prompt": CLIP, **body}, field, words)


def test_the_bytes_writers_are_the_file_writers(tmp_path):
    from latentdiff.audio import wav_bytes, write_wav
    from latentdiff.images import save_webp, webp_bytes

    rng = np.random.default_rng(0)
    frames = [Image.fromarray(rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)) for _ in range(3)]
    params = {"prompt": "é", "seed": 1}
    data = webp_bytes(frames, 4.0, params)
    assert data == save_webp(frames, tmp_path / "a.webp", 4.0, params).read_bytes()
    assert read_parameters(io.BytesIO(data)) == params and read_parameters(save_webp(frames, tmp_path / "b.webp")) is None
    wave = np.sin(np.linspace(0, 20, 1000))
    assert wav_bytes(wave, 8000, params) == write_wav(tmp_path / "a.wav", wave, 8000, params).read_bytes()
