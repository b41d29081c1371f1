"""The web demo in a real headless browser: `python -m mgpt4.chat.web` on 127.0.0.1, driven by Chromium.

Needs Gradio, Selenium and Debian's `chromium` + `chromium-driver`; when one is missing the
tests fail and say what to install (CI installs them), they never skip.

MGPT4_DEMO_SCREENSHOT=docs/demo.png python -m pytest tests/test_demo.py   # refresh the README picture
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import urllib.request

import pytest
from PIL import Image, ImageDraw

from mgpt4.chat.web import IDS
from tests.chat_fixtures import (
    python_module,
    readable_tiny_model,
    subprocess_env,
    write_checkpoint,
    write_image,
)

REPLY_TIMEOUT = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scene(path: str) -> str:
    """A picture worth a screenshot: a red circle and a yellow triangle on blue."""
    img = Image.new("RGB", (320, 240), (40, 70, 160))
    draw = ImageDraw.Draw(img)
    draw.ellipse((40, 60, 160, 180), fill=(210, 40, 40))
    draw.polygon([(200, 180), (290, 180), (245, 90)], fill=(240, 200, 40))
    img.save(path)
    return path


@pytest.fixture(scope="module")
def server(tokenizer, tmp_path_factory):
    try:
        import gradio  # noqa: F401
    except ImportError:
        pytest.fail("the web demo test needs Gradio: pip install 'gradio>=6,<7'")
    root = tmp_path_factory.mktemp("demo")
    checkpoint = write_checkpoint(readable_tiny_model(tokenizer), str(root / "trained"))
    port = free_port()
    log_path = root / "server.log"
    argv = python_module(
        "mgpt4.chat.web",
        *("--checkpoint", checkpoint, "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)),
        *("--greedy", "--max-new-tokens", "16", "--repetition-penalty", "1.3"),
        # 0.1 megapixels: the 320x240 scene passes, a 640x480 upload is "too large".
        *("--max-image-megapixels", "0.1"),
    )
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env())
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_server(proc, url, log_path)
        yield {"url": url, "root": root, "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_server(proc: subprocess.Popen, url: str, log_path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the demo server exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(
                f"the demo server did not answer on {url} within {timeout} s:\n{log_path.read_text()}"
            )
        time.sleep(0.3)


@pytest.fixture(scope="module")
def browser():
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("the web demo test needs Selenium: pip install selenium")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.fail(
            "the web demo test needs Debian's chromium and its driver: apt-get install -y chromium chromium-driver"
        )
    options = Options()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1250",
    ):
        options.add_argument(arg)
    # An explicit driver path: Selenium would otherwise try to download one.
    drv = webdriver.Chrome(service=Service(driver), options=options)
    yield drv
    drv.quit()


class Page:
    """The demo page as a person sees it: an upload box, a question box, a Send button, chat bubbles."""

    def __init__(self, driver, url: str):
        from selenium.webdriver.common.by import By

        self.d, self.by = driver, By
        driver.get(url)
        self.wait_for(
            lambda: driver.find_elements(By.CSS_SELECTOR, f"#{IDS['upload']} input[type=file]"), "the page"
        )

    def wait_for(self, condition, what: str, timeout: float = REPLY_TIMEOUT):
        from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        wait = WebDriverWait(
            self.d, timeout, poll_frequency=0.1, ignored_exceptions=[StaleElementReferenceException]
        )
        try:
            return wait.until(lambda _: condition())
        except TimeoutException:
            raise AssertionError(
                f"{what} did not appear within {timeout} s; the chat shows {self.messages()}"
            ) from None

    def upload(self, path: str) -> None:
        self.d.find_element(self.by.CSS_SELECTOR, f"#{IDS['upload']} input[type=file]").send_keys(path)

    def ask(self, question: str) -> None:
        box = self.d.find_element(self.by.CSS_SELECTOR, f"#{IDS['question']} textarea")
        box.clear()
        box.send_keys(question)
        self.d.find_element(self.by.ID, IDS["send"]).click()

    def click(self, name: str) -> None:
        self.d.find_element(self.by.ID, IDS[name]).click()

    def messages(self) -> list[tuple[str, str]]:
        """The chat bubbles, oldest first, as (user|bot, text)."""
        bubbles = self.d.find_elements(
            self.by.CSS_SELECTOR, f"#{IDS['chatbot']} [data-testid=user], #{IDS['chatbot']} [data-testid=bot]"
        )
        return [(b.get_attribute("data-testid"), b.text.strip()) for b in bubbles]

    def idle(self) -> bool:
        """No event of the chat box is running (Gradio hides the box's status tracker then)."""
        tracker = self.d.find_element(self.by.CSS_SELECTOR, f"#{IDS['chatbot']} [data-testid=status-tracker]")
        return "hide" in (tracker.get_attribute("class") or "").split()

    def reply_to(self, question: str) -> str:
        """Ask and wait until the bot's whole answer to it is on the page; returns the answer."""
        self.ask(question)

        def answered():
            msgs = self.messages()
            done = len(msgs) >= 2 and msgs[-2] == ("user", question) and msgs[-1][0] == "bot"
            return msgs[-1][1] if done and msgs[-1][1] and self.idle() else None

        return self.wait_for(answered, f"a reply to {question!r}")

    def says(self, text: str, what: str) -> None:
        self.wait_for(lambda: any(text in t for _, t in self.messages()), what)


def test_upload_ask_and_a_reply_appears(server, browser):
    page = Page(browser, server["url"])
    page.upload(scene(str(server["root"] / "scene.png")))
    page.says("Got the image (320×240)", "the upload's confirmation")
    first = page.reply_to("What is in the picture?")
    assert any(c.isalpha() for c in first), first
    second = page.reply_to("Which shape is on the left?")
    assert [who for who, _ in page.messages()] == ["bot", "user", "bot", "user", "bot"]
    # Reset forgets the conversation: the same first question gets the same greedy answer.
    page.click("reset")
    page.wait_for(lambda: not page.messages(), "an empty chat after reset")
    assert page.reply_to("What is in the picture?") == first
    assert page.reply_to("Which shape is on the left?") == second
    # So does the chat box's own bin icon.
    page.d.find_element(page.by.CSS_SELECTOR, f"#{IDS['chatbot']} button[aria-label=Clear]").click()
    page.wait_for(lambda: not page.messages(), "an empty chat after the bin icon")
    assert page.reply_to("What is in the picture?") == first
    # The README's picture: a fresh page with one exchange (MGPT4_DEMO_SCREENSHOT=docs/demo.png refreshes it).
    page = Page(browser, server["url"])
    page.upload(scene(str(server["root"] / "scene.png")))
    page.says("Got the image", "the upload's confirmation")
    assert page.reply_to("What is in the picture?") == first
    browser.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.5)  # let the chat's slide-in animation finish
    shot = os.environ.get("MGPT4_DEMO_SCREENSHOT") or str(server["root"] / "demo.png")
    browser.save_screenshot(shot)
    with Image.open(shot) as img:
        assert img.size[0] == 1280 and img.size[1] > 800, img.size


def test_bad_uploads_get_a_message_in_the_chat(server, browser):
    page = Page(browser, server["url"])
    fake = server["root"] / "holiday.png"
    fake.write_text("not a picture at all\n")
    page.upload(str(fake))
    page.says("holiday.png is not an image", "the not-an-image message")
    page.ask("What is in the picture?")
    page.says("Upload an image first", "the no-image message")
    Image.new("RGB", (640, 480), (0, 0, 0)).save(server["root"] / "large.png")
    page.upload(str(server["root"] / "large.png"))
    page.says(
        "large.png is 640x480 pixels; images up to 0.1 megapixels are accepted", "the too-large message"
    )
    # The page still works after bad uploads.
    page.upload(write_image(str(server["root"] / "flag.png")))
    page.says("Got the image (96×64)", "the upload's confirmation")
    assert page.reply_to("What is in the picture?")
    assert "Traceback" not in server["log"].read_text()
