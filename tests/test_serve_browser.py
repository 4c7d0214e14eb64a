"""The web page in a real headless Chromium (Debian's, driven by Playwright): type a prompt, generate, see the image
in the gallery; its PNG carries the parameters asked for; a video model's clip plays in an <img>, an audio model's WAV
in an <audio>. Skips where chromium or playwright is absent."""

import io
import json
import os
import shutil
import urllib.request

import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("no chromium (apt-get install -y chromium)", allow_module_level=True)

from _serve import running

import latentdiff
from latentdiff.serve.app import ServeConfig

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_page_generates_and_the_png_carries_its_parameters():
    pipe = latentdiff.load("default")
    with running(pipe, ServeConfig()) as (url, _), sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url + "/")
            page.wait_for_function("document.querySelector('#sampler').options.length > 0")
            page.fill("#prompt", "a large red circle on the left")
            page.fill("#steps", "6")
            page.fill("#seed", "11")
            page.select_option("#sampler", "euler")
            page.click("#generate")
            image = page.wait_for_selector("#gallery img.result", timeout=60_000)
            src = image.get_attribute("src")
            page.wait_for_function("document.querySelector('#gallery img.result').naturalWidth > 0")
            assert page.evaluate("document.querySelector('#gallery img.result').naturalWidth") == 32
            assert page.get_attribute("#preview", "src").startswith("data:image/png;base64,")  # a live preview
            # Inpainting: the result into the editor, a stroke drawn on the mask canvas, generate again.
            page.click("#gallery button")
            page.wait_for_selector("#editor:not([hidden])")
            box = page.locator("#mask").bounding_box()
            page.mouse.move(box["x"] + 20, box["y"] + 20)
            page.mouse.down()
            page.mouse.move(box["x"] + 90, box["y"] + 60, steps=8)
            page.mouse.up()
            page.click("#generate")
            page.wait_for_function("document.querySelectorAll('#gallery img.result').length == 2", timeout=60_000)
            _, edited = _png_parameters(page.get_attribute("#gallery img.result", "src"))  # the newest first
            assert edited["edit"] == "inpaint" and edited["strength"] == 1.0
            assert not errors, errors
            _, params = _png_parameters(src)  # the first result's PNG
        finally:
            browser.close()
    assert params["prompt"] == "a large red circle on the left"
    assert (params["steps"], params["seed"], params["sampler"]) == (6, 11, "euler")


def _png_parameters(url: str) -> tuple[Image.Image, dict]:
    with urllib.request.urlopen(url, timeout=30) as r:
        image = Image.open(io.BytesIO(r.read()))
    return image, json.loads(image.info["parameters"])


def test_page_shows_a_video_models_clip_and_an_audio_models_wav(tmp_path):
    from _tiny import tiny_audio_model, tiny_model_folder, train_video

    video = latentdiff.load(train_video(tiny_model_folder(tmp_path / "image"), tmp_path / "video"))
    audio = latentdiff.load(tiny_audio_model(tmp_path / "audio"))
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            with running(video, ServeConfig()) as (url, _):
                page, errors = _generate(browser, url, {"#frames": "3", "#fps": "4"})
                page.wait_for_function("document.querySelector('#gallery img.result').naturalWidth > 0")
                assert page.evaluate("document.querySelector('#gallery img.result').naturalWidth") == 16
                src = page.get_attribute("#gallery img.result", "src")
                with urllib.request.urlopen(src, timeout=30) as r:
                    assert Image.open(io.BytesIO(r.read())).n_frames == 3
                assert "3 frames at 4 fps" in page.text_content("#gallery figcaption")
                assert page.is_hidden("#image_file") and page.is_hidden("#seconds")  # no video editing
                assert not errors, errors
            with running(audio, ServeConfig()) as (url, _):
                page, errors = _generate(browser, url, {"#seconds": "0.512"})
                page.wait_for_selector("#gallery audio.result[controls]", timeout=60_000)
                page.wait_for_function("document.querySelector('#gallery audio.result').readyState >= 1")
                assert abs(page.evaluate("document.querySelector('#gallery audio.result').duration") - 0.512) < 1e-3
                assert not errors, errors
        finally:
            browser.close()


def _generate(browser, url: str, fields: dict):
    """A new page on ``url``, a prompt and ``fields`` filled in, Generate clicked, a result shown: (page, its errors)."""
    page, errors = browser.new_page(), []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_function("document.querySelector('#sampler').options.length > 0")
    page.fill("#prompt", "a red circle")
    page.fill("#steps", "2")
    for selector, value in fields.items():
        page.fill(selector, value)
    page.click("#generate")
    page.wait_for_selector("#gallery .result", timeout=60_000)
    return page, errors
