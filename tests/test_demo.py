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

from mgpt4.chat.session import ChatSession
from mgpt4.chat.web import IDS
from mgpt4.model.generation import GenerationSettings
from tests.chat_fixtures import (
    python_module,
    readable_tiny_model,
    subprocess_env,
    write_checkpoint,
    write_image,
)

REPLY_TIMEOUT = 60
# The decoding the server below is started with (its --greedy ... --max-context flags).
SERVED = GenerationSettings(max_new_tokens=16, sample=False, repetition_penalty=1.3, max_context=200)


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
    model = readable_tiny_model(tokenizer)
    checkpoint = write_checkpoint(model, str(root / "trained"))
    port = free_port()
    log_path = root / "server.log"
    argv = python_module(
        "mgpt4.chat.web",
        *("--checkpoint", checkpoint, "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)),
        *("--greedy", "--max-new-tokens", "16", "--repetition-penalty", "1.3"),
        # 0.1 megapixels: the 320x240 scene passes, a 640x480 upload is "too large"; 0.05 MB (51.2 KB):
        # the drawings pass, a photo-like (noisy) file is too large; 200 tokens of context hold the
        # two-question conversations and drop the oldest turns of longer ones.
        *("--max-image-megapixels", "0.1", "--max-image-mb", "0.05", "--max-context", "200"),
    )
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=subprocess_env())
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_for_server(proc, url, log_path)
        yield {"url": url, "root": root, "log": log_path, "model": model}
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

    def bubbles(self) -> list[str]:
        """The chat as a person sees it: the text of each bubble (Gradio's message rows), oldest first."""
        rows = self.d.find_elements(self.by.CSS_SELECTOR, f"#{IDS['chatbot']} .message-row")
        return [r.text.strip() for r in rows]

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


def reference_replies(server, image: str, questions: list[str]) -> list[str]:
    """The replies a ChatSession on the served model gives with the server's settings, as the page shows
    text (runs of white space as one)."""
    session = ChatSession(server["model"])
    session.set_image(image)
    return [" ".join(session.reply(q, SERVED).split()) for q in questions]


def test_upload_ask_and_a_reply_appears(server, browser):
    page = Page(browser, server["url"])
    page.upload(scene(str(server["root"] / "scene.png")))
    page.says("Got the image (320×240)", "the upload's confirmation")
    first = page.reply_to("What is in the picture?")
    assert any(c.isalpha() for c in first), first
    second = page.reply_to("Which shape is on the left?")
    questions = ["What is in the picture?", "Which shape is on the left?"]
    assert [first, second] == reference_replies(server, str(server["root"] / "scene.png"), questions)
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
    reply = page.reply_to("What is in the picture?")
    assert reply and [reply] == reference_replies(
        server, str(server["root"] / "flag.png"), ["What is in the picture?"]
    )
    assert "Traceback" not in server["log"].read_text()


def ask_and_wait(page: Page, question: str) -> list[tuple[str, str]]:
    """Ask and wait until the answer (and any note after it) is on the page; the chat's messages."""
    page.ask(question)

    def answered():
        msgs = page.messages()
        asked = [k for k, m in enumerate(msgs) if m == ("user", question)]
        return msgs if asked and asked[-1] < len(msgs) - 1 and msgs[-1][1] and page.idle() else None

    return page.wait_for(answered, f"a reply to {question!r}")


def test_rejected_uploads_keep_the_image_and_the_conversation(server, browser):
    """Issue 16.12: one size limit, said one way (Gradio refuses a larger file in the browser with the
    number the label gives); a file that is not an image gets a note and changes nothing; and a long
    chat is told once that its oldest turns are left out (issue 11.13)."""
    root = server["root"]
    reference = Page(browser, server["url"])
    reference.upload(scene(str(root / "scene.png")))
    reference.says("Got the image (320×240)", "the upload's confirmation")
    first = reference.reply_to("What is in the picture?")
    second = reference.reply_to("Which shape is on the left?")

    page = Page(browser, server["url"])
    label = page.d.find_element(page.by.ID, IDS["upload"]).text
    assert "up to 51.2 KB and 0.1 megapixels" in label, label
    page.upload(scene(str(root / "scene.png")))
    page.says("Got the image (320×240)", "the upload's confirmation")
    assert page.reply_to("What is in the picture?") == first
    noisy = root / "photo.png"
    Image.frombytes("RGB", (200, 200), os.urandom(200 * 200 * 3)).save(noisy)
    assert noisy.stat().st_size > 0.05 * 2**20
    page.upload(str(noisy))
    page.wait_for(
        lambda: (
            "exceed the maximum allowed size of 51.2" in page.d.find_element(page.by.TAG_NAME, "body").text
        ),
        "Gradio's too-large message",
    )
    fake = root / "notes.png"
    fake.write_text("not a picture at all\n")
    page.upload(str(fake))
    page.says("notes.png is not an image", "the not-an-image message")
    page.says("The conversation about the previous image goes on", "the note that nothing changed")
    assert page.messages()[1:3] == [("user", "What is in the picture?"), ("bot", first)]
    assert page.d.find_elements(page.by.CSS_SELECTOR, f"#{IDS['preview']} img")  # the image is still shown
    # The conversation goes on where it was: the same second reply as without the bad uploads.
    assert ask_and_wait(page, "Which shape is on the left?")[-1] == ("bot", second)
    for k in range(4):
        msgs = ask_and_wait(page, f"And what is in corner number {k}?")
    notes = [t for who, t in msgs if who == "bot" and "oldest questions and answers are left out" in t]
    assert len(notes) == 1, msgs
    assert "Traceback" not in server["log"].read_text()


def test_an_upload_warning_is_its_own_bubble(server, browser):
    """Issue 20.14: a rejected upload's warning after a reply is a message of its own, not more text in
    the bubble of the model's previous reply; so is each note after a reply."""
    root = server["root"]
    page = Page(browser, server["url"])
    page.upload(scene(str(root / "scene.png")))
    page.says("Got the image (320×240)", "the upload's confirmation")
    first = page.reply_to("What is in the picture?")
    fake = root / "minutes.png"
    fake.write_text("not a picture at all\n")
    page.upload(str(fake))
    page.says("minutes.png is not an image", "the not-an-image message")
    bubbles = page.bubbles()
    assert len(bubbles) == len(page.messages()) == 4, bubbles
    assert first in bubbles[2] and "minutes.png" not in bubbles[2], bubbles
    assert "minutes.png is not an image" in bubbles[3] and first not in bubbles[3], bubbles


def test_a_busy_port_is_named_before_the_model_loads(tmp_path):
    try:
        import gradio  # noqa: F401
    except ImportError:
        pytest.fail("the web demo test needs Gradio: pip install 'gradio>=6,<7'")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        # The checkpoint does not exist: the port must be checked before the model is looked for.
        argv = python_module(
            "mgpt4.chat.web",
            "--checkpoint",
            str(tmp_path / "nowhere"),
            "--device",
            "cpu",
            "--port",
            str(port),
        )
        proc = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert proc.returncode == 1
    assert (
        f"--port {port}: 127.0.0.1:{port} is already in use" in proc.stderr
        and "choose another --port" in proc.stderr
    )
    assert "Loading the model" not in proc.stdout and "Traceback" not in proc.stderr
