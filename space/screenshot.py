"""Drives the Space in a real headless browser (Debian's Chromium and its driver, through Selenium): uploads an
image, classifies it, looks inside, and saves a screenshot of the page.

    python space/screenshot.py --output docs/space.png        # launches the app on the shipped backbone and tasks
    python space/screenshot.py --url http://127.0.0.1:7860 --image my.png --output page.png

Needs ``apt-get install chromium chromium-driver`` and the ``test`` extra (Selenium). The page is checked, not
just captured: the run fails unless the predictions and the attention heatmaps are on the page when it is saved.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path


HERE = Path(__file__).resolve().parent


def find_browser() -> tuple[str, str] | None:
    """``(chromium, chromedriver)`` executables, or ``None`` where they are not installed."""
    browser = os.environ.get("VPTM_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("VPTM_CHROMEDRIVER") or shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def capture(url: str, image: str, output: str, timeout: float = 60.0, size: tuple[int, int] = (1400, 1300)) -> dict:
    """Uploads ``image`` at ``url``, runs Classify then Look inside, saves the page to ``output`` (PNG).

    Returns what the page showed: ``{"predictions": text, "heatmaps": n, "tokens": n}``; raises ``RuntimeError`` if
    the browser is missing and selenium's ``TimeoutException`` if the page does not show the results in time.
    """
    from selenium import webdriver
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    found = find_browser()
    if found is None:
        raise RuntimeError("no Chromium with its driver: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={size[0]},{size[1]}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=found[1]))
    try:
        wait = WebDriverWait(driver, timeout)
        driver.get(url)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#image-input input[type=file]"))
        upload.send_keys(str(Path(image).resolve()))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image-input img"))
        driver.find_element(By.ID, "classify-button").click()
        predictions = wait.until(lambda d: d.find_element(By.ID, "predictions").text.strip() or None)

        def images_in(d, selector):
            found = d.find_elements(By.CSS_SELECTOR, f"{selector} img")
            loaded = [e for e in found if d.execute_script("return arguments[0].naturalWidth", e)]
            return len(loaded) or None

        driver.find_element(By.ID, "look-button").click()
        heatmaps = wait.until(lambda d: images_in(d, "#heatmaps"))
        tokens = len(driver.find_elements(By.CSS_SELECTOR, "#tokens img"))
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(output))
        return {"predictions": predictions, "heatmaps": heatmaps, "tokens": tokens}
    except Exception:
        # the page as it was when it failed, beside where the screenshot would have been
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(Path(output).with_suffix(".failed.png")))
        raise
    finally:
        driver.quit()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="A running Space; by default the app is launched here.")
    parser.add_argument("--image", default=str(HERE / "examples" / "bag.png"))
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    demo = None
    url = args.url
    if url is None:
        from app import DemoService, build_demo, bundled_tasks

        from modeling_vptm import SHIPPED_BACKBONE

        demo = build_demo(DemoService(SHIPPED_BACKBONE, bundled_tasks())).queue()
        _, url, _ = demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    try:
        print(capture(url, args.image, args.output))
    finally:
        if demo is not None:
            demo.close()


if __name__ == "__main__":
    main()
