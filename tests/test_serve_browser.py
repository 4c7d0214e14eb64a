"""The web page in a real headless Chromium (Debian's, driven by Playwright): type a prompt, generate, see the image
in the gallery; its PNG carries the parameters asked for. Skips where chromium or playwright is absent."""

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
