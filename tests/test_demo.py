"""The demo page (client/demo.py) in a real headless Chromium (Debian's, driven by Playwright) against
a real TorchServe: what a person sees after dropping photos - the class names, the box, the model and
version, errors in the server's words - with the default and the hardened profile, and with
TorchServe down. A screenshot of the page lands in var/demo.png (the README's is one)."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pillow_heif
import pytest
import requests
from helpers import DEFAULT, ROOT, SHARED_CARS
from PIL import Image
from playwright.sync_api import Page, expect, sync_playwright

from serving.torchserve import free_port

# make env installs Debian's chromium; a CI runner may bring Google Chrome instead
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("google-chrome")
SCREENSHOT = ROOT / "var" / "demo.png"
WAIT_MS = 90_000


def start_demo(inference: str, management: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "client.demo", "--port", "0", "--url", inference, "--management_url", management]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, **(env or {})}
    )
    line = proc.stdout.readline()  # "car classifier demo on http://127.0.0.1:PORT (...)"
    assert "demo on http://127.0.0.1:" in line, line
    return proc, line.split(" on ", 1)[1].split()[0]


@pytest.fixture(scope="module")
def chromium():
    assert CHROMIUM, "no chromium or google-chrome: make env installs Debian's chromium"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def demo(server):
    proc, url = start_demo(server.url("inference"), server.url("management"))
    yield url
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def whole_photos(car_images) -> dict[str, Path]:
    """The uncropped photos of a few training cars: {class name: path}."""
    return {label: SHARED_CARS / "photos" / label / path.name for label, path in list(car_images.items())[:2]}


def upload(page: Page, files: list[Path]) -> None:
    page.set_input_files("#files", [str(f) for f in files])
    expect(page.locator(".card.done")).to_have_count(len(files), timeout=WAIT_MS)


def test_the_page_shows_answers_boxes_and_errors(chromium, demo, whole_photos, street, tmp_path):
    heic = tmp_path / "phone.heic"  # a format the browser cannot show: the page server previews it
    heic_label, photo = list(whole_photos.items())[1]
    pillow_heif.from_pillow(Image.open(photo).convert("RGB")).save(heic, quality=90)
    pdf = tmp_path / "scan.pdf"
    pdf.write_bytes(b"%PDF-1.4\n% not a car\n")
    huge = tmp_path / "huge.png"
    huge.write_bytes(b"\x89PNG" + bytes(31 * 1024 * 1024))
    page = chromium.new_page(viewport={"width": 1200, "height": 1000})
    page.goto(demo)
    expect(page.locator("#version option")).to_contain_text(["default", "1.0 (default)"])
    upload(page, [*whole_photos.values(), heic, street[0], pdf, huge])

    cards = page.locator(".card")
    for index, label in enumerate([*whole_photos, heic_label]):
        card = cards.nth(index)
        expect(card.locator(".top li").first).to_contain_text(label)  # training cars: the top-1
        expect(card.locator(".meta")).to_contain_text(f"{DEFAULT} v1.0")
        expect(card.locator(".top li")).to_have_count(5)
        expect(card.locator(".box").first).to_be_visible()  # the shipped model finds the car
        expect(card.locator(".box .tag").first).to_contain_text(label)  # labelled with its top-1
    several = cards.nth(3)  # a street of three cars: every car boxed and listed with its label
    expect(several.locator(".meta")).to_contain_text("cars")
    assert (
        several.locator(".box").count() >= 3 and several.locator(".cars li").count() == several.locator(".box").count()
    )
    expect(several.locator(".box .tag").first).to_contain_text("1. ")
    expect(cards.nth(4).locator(".error")).to_contain_text("415: not an image in a supported format")
    expect(cards.nth(5).locator(".error")).to_contain_text("413: image is")

    cards.first.locator(".explain").click()
    expect(cards.first.locator(".explain")).to_contain_text("Heat map of", timeout=WAIT_MS)
    expect(cards.first.locator(".heatmap")).to_be_visible()
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=SCREENSHOT, full_page=True)
    page.close()


def test_the_version_picker_asks_that_model_and_version(chromium, demo, whole_photos):
    page = chromium.new_page()
    page.goto(demo)
    page.select_option("#model", "resnet50_cars")
    page.select_option("#version", "1.0")
    upload(page, list(whole_photos.values())[:1])
    card = page.locator(".card").first
    expect(card.locator(".meta")).to_contain_text("resnet50_cars v1.0")
    expect(card.locator(".box")).to_be_hidden()  # no box head: "box": null
    page.close()


def test_torchserve_down_is_said_on_the_page(chromium, whole_photos):
    dead = f"http://127.0.0.1:{free_port()}"
    proc, url = start_demo(dead, f"http://127.0.0.1:{free_port()}")
    try:
        page = chromium.new_page()
        page.goto(url)
        expect(page.locator("#status")).to_contain_text("TorchServe not reachable at http://127.0.0.1:")
        upload(page, list(whole_photos.values())[:1])
        expect(page.locator(".card .error")).to_contain_text(f"502: TorchServe not reachable at {dead}")
        page.close()
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_hardened_profile_keeps_its_keys_from_the_browser(chromium, hardened_server, whole_photos):
    hardened = hardened_server
    keys = {kind: hardened.token(kind) for kind in ("inference", "management")}
    env = {"TS_INFERENCE_TOKEN": keys["inference"], "TS_MANAGEMENT_TOKEN": keys["management"]}
    proc, url = start_demo(hardened.url("inference"), hardened.url("management"), env)
    seen: list[bytes] = []
    try:
        page = chromium.new_page()
        page.on("request", lambda request: seen.append(str(request.headers).encode()))
        page.on("response", lambda response: seen.append(response.body()))
        page.goto(url)
        upload(page, list(whole_photos.values())[:1])
        label = next(iter(whole_photos))
        expect(page.locator(".card .top li").first).to_contain_text(label)
        page.close()
    finally:
        proc.terminate()
        proc.wait(10)
    assert len(seen) > 4 and not any(key.encode() in text for text in seen for key in keys.values())


def test_the_preview_of_a_heic_keeps_the_photos_size(demo, whole_photos):
    """The page places the box by the photo's own size, which the preview reports beside a smaller JPEG."""
    photo = next(iter(whole_photos.values()))
    image = Image.open(photo).convert("RGB").resize((1600, 1200))
    heic = io.BytesIO()
    pillow_heif.from_pillow(image).save(heic, quality=80)
    response = requests.post(f"{demo}/api/preview", data=heic.getvalue(), timeout=60)
    assert response.status_code == 200 and response.headers["X-Image-Size"] == "1600 1200"
    assert Image.open(io.BytesIO(response.content)).size == (1024, 768)
