"""The verification page (``Verifier.page``, ``finetune.py serve``) in a real headless browser, on a tiny demo run.

Debian's chromium and its chromedriver, driven by Selenium (``apt-get install chromium chromium-driver``;
``.ci/run`` installs them): three references in the formats the command line reads (a 16-bit TIFF, a CMYK
JPEG, an RGBA PNG) and a query are uploaded, Verify is pressed, and the page must show what
``Verifier.verify`` decides for the same files; a file that is not an image gets one message; the uploads are
gone from the server afterwards. The page is served by ``finetune.main(["serve", ...])`` in a thread, on
127.0.0.1 and a free port, and stopped at the end.
"""
from __future__ import annotations

import shutil
import socket
import struct
import threading
import time
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import finetune as finetune_cli
from module.verifier import PAGE_CACHE_SWEEP, Verifier, _page_check

BROWSER = next((found for name in ("chromium", "chromium-browser", "google-chrome") if (found := shutil.which(name))),
               None)
DRIVER = shutil.which("chromedriver")
needs_a_browser = pytest.mark.skipif(
    BROWSER is None or DRIVER is None,
    reason="no headless browser: apt-get install chromium chromium-driver (.ci/run installs them)")
TINY_DEMO = ["--writers", "4", "--samples", "4", "--canvas", "96", "--val-ratio", "0.25", "--image-size", "64",
             "--epochs", "2", "--batch-size", "16", "--lr", "4e-3"]
WAIT_S = 60
ANSWERS = ("GENUINE", "FORGED", "Cannot verify")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "run"
    assert finetune_cli.main(["demo", "--out", str(out), *TINY_DEMO]) == 0
    return out


def scans_in_three_formats(run: Path, folder: Path) -> tuple[list[Path], Path]:
    """Writer 1's first three genuine scans as a 16-bit TIFF, a CMYK JPEG and an RGBA PNG; the fourth as the query."""
    folder.mkdir()
    gray = [np.asarray(Image.open(run / f"data/full_org/original_1_{n}.png").convert("L")) for n in (1, 2, 3)]
    references = [folder / "reference 16-bit.tif", folder / "reference cmyk.jpg", folder / "reference rgba.png"]
    Image.fromarray(gray[0].astype(np.uint16) * 257).save(references[0])
    Image.fromarray(gray[1]).convert("CMYK").save(references[1], quality=95)
    ink = Image.fromarray(255 - gray[2])  # ink opaque on transparent paper
    Image.merge("RGBA", (*[Image.new("L", ink.size, 0)] * 3, ink)).save(references[2])
    query = folder / "query.png"
    shutil.copyfile(run / "data/full_org/original_1_4.png", query)
    return references, query


def oversized_png(path: Path, side: int = 30000) -> Path:
    """A PNG whose header says ``side`` x ``side`` pixels (a decompression bomb to PIL), without the pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def served_page(demo_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """``finetune.py serve --run DEMO --port P`` in a thread; yields its URL and Gradio's upload folder."""
    import gradio

    uploads = tmp_path / "gradio"
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(uploads))
    port, exit_status = free_port(), []
    server = threading.Thread(target=lambda: exit_status.append(
        finetune_cli.main(["serve", "--run", str(demo_run), "--port", str(port)])), daemon=True)
    server.start()
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + WAIT_S
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).close()
            break
        except OSError:
            assert server.is_alive() and time.monotonic() < deadline, f"the page did not come up at {url}"
            time.sleep(0.25)
    yield url, uploads
    gradio.close_all()
    server.join(timeout=WAIT_S)
    assert exit_status == [0]


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1800"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def verify_on_page(driver, references: list[Path], query: Path) -> str:
    """Drop the scans on the page, press Verify, and return the text of the answer once it is there."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def text_of(element_id: str) -> str:  # "" until Gradio has drawn the element
        return " ".join(element.text for element in driver.find_elements(By.ID, element_id))

    wait = WebDriverWait(driver, WAIT_S)
    wait.until(lambda _: driver.find_elements(By.CSS_SELECTOR, "#query input[type=file]"))
    before = text_of("decision")
    driver.find_element(By.CSS_SELECTOR, "#references input[type=file]").send_keys("\n".join(map(str, references)))
    driver.find_element(By.CSS_SELECTOR, "#query input[type=file]").send_keys(str(query))
    # Gradio lists an uploaded file once the server holds it; the name and its extension are separate elements.
    wait.until(lambda _: all(path.stem in text_of("references") for path in references) and query.stem in text_of("query"))
    driver.find_element(By.ID, "verify").click()
    # While it works Gradio shows a timer there; the answer starts with the decision or the problem.
    wait.until(lambda _: text_of("decision") != before and text_of("decision").startswith(ANSWERS))
    return text_of("decision")


@needs_a_browser
def test_the_page_verifies_three_references_and_says_what_a_bad_upload_is(
        served_page: tuple[str, Path], browser, demo_run: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    url, uploads = served_page
    references, query = scans_in_three_formats(demo_run, tmp_path / "scans")
    expected = Verifier.from_run(demo_run).verify(query, references=references)
    browser.get(url)

    answer = verify_on_page(browser, references, query)
    assert answer.splitlines()[0] == ("GENUINE" if expected.genuine else "FORGED"), answer
    assert f"mean distance {expected.distance:.4g}" in answer and f"threshold {expected.threshold:.4g}" in answer
    for path, distance in zip(references, expected.distances):
        assert f"{path.name} {distance:.4g}" in answer, answer
    assert expected.likelihood_ratio is not None, "the demo's report includes calibration.json"
    assert f"Likelihood ratio {expected.likelihood_ratio:.3g}" in answer and expected.verbal_equivalent in answer, answer
    figure = browser.find_element(By.CSS_SELECTOR, "#explanation img")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", figure) > 0
    browser.set_window_size(1200, browser.execute_script("return document.documentElement.scrollHeight") + 100)
    assert browser.save_screenshot(str(tmp_path / "page.png")) and (tmp_path / "page.png").stat().st_size > 10_000
    # The request's uploads are gone from the server, and the page says so.
    names = {path.name for path in [*references, query]}
    assert not [path for path in uploads.rglob("*") if path.name in names]
    assert "deleted from the server" in answer

    not_an_image = tmp_path / "scans" / "not an image.png"
    not_an_image.write_text("a text file with an image's name")
    message = verify_on_page(browser, references[:1], not_an_image)
    assert message.startswith("Cannot verify: cannot decode image not an image.png"), message
    assert str(uploads) not in message and "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    assert not [path for path in uploads.rglob("*") if path.name in names | {not_an_image.name}]


def test_bad_uploads_get_one_message_naming_the_file_and_are_deleted(demo_run: Path, tmp_path: Path) -> None:
    verifier = Verifier.from_run(demo_run)

    def uploaded(name: str) -> Path:  # as Gradio keeps an upload: in a folder of its own
        folder = tmp_path / f"upload-{name}"
        folder.mkdir()
        return folder / name

    reference = uploaded("reference.png")
    blank = uploaded("blank.png")
    Image.new("L", (200, 100), 255).save(blank)
    bad = {blank: "holds no ink", oversized_png(uploaded("huge.png")): "too large for a scan (900 megapixels",
           uploaded("missing.png"): "not found"}
    for query, words in bad.items():
        reference.parent.mkdir(exist_ok=True)  # each check deletes it
        shutil.copyfile(demo_run / "data/full_org/original_1_1.png", reference)
        message, figure = _page_check(verifier, [str(reference)], str(query))
        assert figure == "" and message.startswith('<p role="alert">Cannot verify: '), message
        assert words in message and query.name in message and str(tmp_path) not in message, message
        assert not reference.parent.exists() and not query.parent.exists()  # deleted, with Gradio's folder

    message, figure = _page_check(verifier, [], None)
    assert "Drop one or more reference scans" in message and figure == ""


def test_a_verifier_without_calibration_shows_the_decision_without_a_likelihood_ratio(demo_run: Path,
                                                                                      tmp_path: Path) -> None:
    verifier = Verifier.from_run(demo_run)
    verifier.calibration = None  # a run evaluated before calibration.json was part of its report
    references, query = scans_in_three_formats(demo_run, tmp_path / "scans")
    expected = verifier.verify(query, references=references)
    answer, figure = _page_check(verifier, list(map(str, references)), str(query))
    assert answer.startswith(f'<h2 style="color: #{"1a7f37" if expected.genuine else "b42318"}">')
    assert f"{expected.distance:.4g}" in answer and "Likelihood ratio" not in answer
    assert figure.startswith('<img src="data:image/png;base64,')
    assert not [path for path in tmp_path.rglob("*") if path.is_file()]  # the uploads are deleted


def test_the_page_keeps_nothing_it_need_not_and_sends_no_analytics(demo_run: Path) -> None:
    page = Verifier.from_run(demo_run).page()
    assert page.analytics_enabled is False
    assert page.delete_cache == PAGE_CACHE_SWEEP


def test_serve_without_gradio_is_one_line_before_the_model_loads(monkeypatch: pytest.MonkeyPatch, capsys,
                                                                 tmp_path: Path) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "gradio" else find_spec(name, *rest))
    assert finetune_cli.main(["serve", "--run", str(tmp_path / "no run here")]) == 1
    assert capsys.readouterr().err.strip() == ("error: finetune.py serve needs gradio: pip install -e '.[app]' "
                                               "(or pip install 'gradio>=6,<7')")
