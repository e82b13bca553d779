"""The example chat app end to end: `streamlit run` on a free port, driven by real headless Chromium.

Chromium and chromedriver are Debian's (`chromium`, `chromium-driver`), driven through selenium; the
session fixture installs them with apt-get when they are missing and we are root, and skips
otherwise. Nothing here downloads a browser of its own. The test takes a screenshot of the app; with
CHR_UPDATE_SCREENSHOT=1 it replaces docs/screenshots/chat.png (a test run leaves the tree clean).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="streamlit is not installed (it is in requirements-dev.txt)")
pytest.importorskip("selenium", reason="selenium is not installed (it is in requirements-dev.txt)")

from support.redis_support import dirty_set
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait
from support.servers import fetch_conversation_row, fetch_message_rows, free_port

ROOT = Path(__file__).resolve().parents[2]
APP = ROOT / "examples" / "streamlit_app" / "app.py"
SCREENSHOT = ROOT / "docs" / "screenshots" / "chat.png"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WIDTH, HEIGHT = 1280, 800
CHAT_INPUT = '[data-testid="stChatInputTextArea"]'

pytestmark = [
    pytest.mark.slow,
    # The first run on a fresh machine installs Chromium (about 100 MB from Debian) in the fixture.
    pytest.mark.timeout(600),
]


@pytest.fixture(scope="session")
def chromium() -> tuple[Path, Path]:
    """(chromium, chromedriver), installed from Debian's packages when missing and we are root."""
    if CHROMIUM.exists() and CHROMEDRIVER.exists():
        return CHROMIUM, CHROMEDRIVER
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"{CHROMIUM} or {CHROMEDRIVER} missing: `apt-get install chromium chromium-driver` as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"]
    done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=540)
    if done.returncode != 0:  # a stale package list: refresh it once
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300)
        done = subprocess.run(install, env=env, capture_output=True, text=True, timeout=540)
    if done.returncode != 0 or not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"could not install chromium and chromium-driver:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return CHROMIUM, CHROMEDRIVER


@dataclass
class RunningApp:
    url: str
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM, as a service manager stops it; Streamlit then shuts down its sessions and exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture
def streamlit_app(pg_url, rdb, user_id, tmp_path):
    """The app in local_redis mode on this test's database and Redis, no background flush."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("POSTGRES_", "REDIS_"))}
    env.update(
        CHAT_HISTORY_MODE="local_redis",
        DATABASE_URL=pg_url,
        REDIS_CONNECTION_STRING=rdb.url,
        LOCAL_TEST_CLIENT_ID=user_id,
        LOCAL_TEST_USERNAME="Ada Lovelace",
        # Only the app's own flushes (session end, exit) write back during the test.
        CHAT_HISTORY_FLUSH_INTERVAL="3600",
        STREAMLIT_BROWSER_GATHER_USAGE_STATS="false",
    )
    log = tmp_path / "streamlit.log"
    command = [
        sys.executable, "-m", "streamlit", "run", str(APP),
        "--server.headless", "true", "--server.address", "127.0.0.1", "--server.port", str(port),
        "--server.fileWatcherType", "none", "--client.toolbarMode", "minimal",
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
    app = RunningApp(f"http://127.0.0.1:{port}/", proc, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"streamlit exited with {proc.returncode}:\n{app.output()}")
            try:
                with urllib.request.urlopen(f"{app.url}_stcore/health", timeout=2) as response:
                    if response.read() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"streamlit did not answer on {app.url} within 60 s:\n{app.output()}")
            time.sleep(0.2)
        yield app
    finally:
        app.stop()


@pytest.fixture
def browser(chromium, tmp_path, monkeypatch):
    binary, driver_path = chromium
    monkeypatch.setenv("SE_OFFLINE", "true")  # selenium must never fetch a browser or driver of its own
    options = webdriver.ChromeOptions()
    options.binary_location = str(binary)
    for arg in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--hide-scrollbars", f"--window-size={WIDTH},{HEIGHT}",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):  # fmt: skip
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(driver_path)))
    driver.set_page_load_timeout(60)
    # The page's viewport, not the window, is what the screenshot shows: make it exactly WIDTH x HEIGHT.
    driver.execute_cdp_cmd(
        "Emulation.setDeviceMetricsOverride",
        {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
    )
    try:
        yield driver
    finally:
        driver.quit()


def wait_for_text(driver, *texts: str, timeout: float = 30) -> None:
    def shown(d) -> bool:
        body = d.find_element(By.TAG_NAME, "body").text
        return all(text in body for text in texts)

    WebDriverWait(driver, timeout, poll_frequency=0.2).until(shown, message=f"never showed {texts}")


def send(driver, text: str) -> None:
    box = WebDriverWait(driver, 30).until(lambda d: d.find_element(By.CSS_SELECTOR, CHAT_INPUT))
    box.click()
    box.send_keys(text)
    box.send_keys(Keys.ENTER)


def wait_until(condition, timeout: float = 20, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def test_chat_in_a_real_browser_survives_a_reload(streamlit_app, browser, rdb, pg_conn, user_id, tmp_path):
    browser.get(streamlit_app.url)
    wait_for_text(browser, "Signed in as Ada Lovelace", "New chat")

    send(browser, "Plan two days in Lisbon.")
    wait_for_text(browser, "[gpt-4o stub, turn 1] You said: Plan two days in Lisbon.")
    # The open chat is in the URL, so a reload reopens it.
    chat_id = wait_until(lambda: browser.current_url.partition("chat=")[2], what="?chat= in the URL")
    assert fetch_conversation_row(pg_conn, chat_id) is None, "write-back: only Redis has it so far"

    browser.refresh()
    wait_for_text(browser, "Plan two days in Lisbon.", "[gpt-4o stub, turn 1] You said: Plan two days in Lisbon.")
    # The reload closed the first session's websocket; Streamlit released its session resource, and
    # the app wrote the chat back to PostgreSQL.
    wait_until(lambda: fetch_conversation_row(pg_conn, chat_id), what="the session-end flush")
    assert len(fetch_message_rows(pg_conn, chat_id)) == 2
    assert "session of Ada Lovelace ended: flushed 1 conversation(s)" in streamlit_app.output()

    send(browser, "And a third day?")
    wait_for_text(browser, "[gpt-4o stub, turn 2] You said: And a third day?")
    shot = SCREENSHOT if os.environ.get("CHR_UPDATE_SCREENSHOT") == "1" else tmp_path / "chat.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000, "the screenshot is not a blank page"

    # Stopping the app writes back what is still dirty (session shutdown, then the exit hook).
    assert streamlit_app.stop() == 0, streamlit_app.output()
    rows = fetch_message_rows(pg_conn, chat_id)
    assert [(r[1], r[2]) for r in rows][2:] == [
        ("user", "And a third day?"),
        ("assistant", "[gpt-4o stub, turn 2] You said: And a third day?"),
    ]
    assert dirty_set(rdb.client) == set()
