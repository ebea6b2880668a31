"""A screenshot of the verification page answering one check (the README's docs/page.png).

    python finetune.py demo --out runs/demo
    python tools/page_screenshot.py --run runs/demo --out docs/page.png

The page of the run is served on 127.0.0.1 in this process; headless chromium (Debian's ``chromium`` and
``chromium-driver``, driven by Selenium) drops three references and a query, presses Verify and takes the
picture. Without --references/--query, a demo run's writer 1: its first three genuine scans against its
first forgery.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from PIL import Image

from module.verifier import Verifier

WAIT_S = 120
HEIGHT = 3000  # pixels: more than the page with its figure


def screenshot(url: str, references: list[Path], query: Path, out: Path, width: int = 1100) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver_path = shutil.which("chromedriver")
    if browser is None or driver_path is None:
        raise SystemExit("needs chromium and chromedriver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", f"--window-size={width},{HEIGHT}",
                     "--hide-scrollbars"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(url)
        wait = WebDriverWait(driver, WAIT_S)
        wait.until(lambda _: driver.find_elements(By.CSS_SELECTOR, "#query input[type=file]"))
        driver.find_element(By.CSS_SELECTOR, "#references input[type=file]").send_keys("\n".join(map(str, references)))
        driver.find_element(By.CSS_SELECTOR, "#query input[type=file]").send_keys(str(query))
        wait.until(lambda _: query.stem in driver.find_element(By.ID, "query").text)
        driver.find_element(By.ID, "verify").click()
        wait.until(lambda _: driver.find_elements(By.CSS_SELECTOR, "#explanation img"))
        wait.until(lambda _: driver.execute_script("return document.querySelector('#explanation img').complete"))
        # The window is taller than the page; the picture is cut below the figure.
        bottom = driver.execute_script("return document.querySelector('#explanation').getBoundingClientRect().bottom")
        out.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out))
    finally:
        driver.quit()
    with Image.open(out) as picture:
        picture.crop((0, 0, picture.width, min(picture.height, int(bottom) + 24))).save(out, optimize=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="run folder (a demo run, unless --references and --query)")
    parser.add_argument("--out", default="docs/page.png", help="the PNG to write (default %(default)s)")
    parser.add_argument("--references", nargs="+", type=Path, default=None, help="reference scans")
    parser.add_argument("--query", type=Path, default=None, help="the scan to check")
    args = parser.parse_args(argv)
    data = Path(args.run) / "data"
    # The browser is handed absolute paths to upload.
    references = [path.resolve() for path in args.references or [data / f"full_org/original_1_{n}.png" for n in (1, 2, 3)]]
    query = (args.query or data / "full_forg/forgeries_1_1.png").resolve()
    page = Verifier.from_run(args.run).page()
    _, url, _ = page.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        screenshot(url, references, query, Path(args.out))
    finally:
        page.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
