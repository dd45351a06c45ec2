"""
The live page in a headless Chromium, served from ANOTHER origin than the gateway's.

A tiny static HTTP server on another host name and port serves the gateway's own page, pointed
at the gateway with ``?gateway=``: everything it does (the allowed channels, the stream, every
publish, every refusal's reason) crosses origins, so it works only with the gateway's CORS.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import threading
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
import pytest

import pgherald
from pgherald.contrib.gateway import create_app
from tests.integration.test_gateway import SECRET, serve, token
from tests.integration.test_gateway_cors import _kill


def _chromium() -> tuple[str, str]:
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        if os.environ.get("CI"):  # on CI a skipped test is a failure: scripts/dev.py installs them
            pytest.fail("chromium/chromedriver missing on CI: scripts/dev.py should install them")
        pytest.skip(
            "chromium/chromedriver not installed (apt-get install chromium chromium-driver)"
        )
    return chromium, driver_path


@contextlib.contextmanager
def static_site(page: bytes) -> Iterator[str]:
    """Serve *page* at every path on a port of its own; yield the site's origin (localhost)."""

    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("content-type", "text/html; charset=utf-8")
            self.send_header("content-length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        # "localhost" here, 127.0.0.1 for the gateway: another host and port, another origin.
        yield f"http://localhost:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_page_from_another_origin_uses_the_gateway(
    dsn: str, conn: psycopg.Connection[Any], tmp_path: Path
) -> None:
    chromium, driver_path = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pgherald.install(conn)
    page = resources.files("pgherald.contrib.gateway").joinpath("static/index.html").read_bytes()
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1000,1100")  # the screenshot shows the events too
    with static_site(page) as site:
        app = create_app(
            dsn,
            jwt_secret=SECRET,
            allow_anonymous=["shop.*"],
            channels=["shop.orders"],
            durable_channels=["shop.ledger"],
            cors_origins=[site],
        )
        with serve(app) as base:
            gateway = base.replace("localhost", "127.0.0.1") + "/"
            assert not gateway.startswith(site)
            browser = webdriver.Chrome(service=Service(driver_path), options=options)
            try:
                browser.get(f"{site}/index.html?gateway={gateway}")
                wait = WebDriverWait(browser, 10)
                field = lambda name: browser.find_element(By.ID, name)  # noqa: E731

                def text(name: str) -> str:
                    return str(field(name).text)

                # Prefilled with what the server allows (a cross-origin fetch of /channels).
                wait.until(lambda b: field("channels").get_attribute("value") == "shop.*")
                assert "shop.*" in text("allowed")

                # A refusal shows its reason: an invalid filter is a 400 with the why.
                field("filter").send_keys("status=like.paid")
                field("connect").click()
                wait.until(lambda b: "refused: 400" in text("events"))
                assert "the operator must be one of" in text("events")

                # A wildcard and a filter.
                field("filter").clear()
                field("filter").send_keys("status=eq.paid")
                field("token").send_keys(token(["shop.*"], "rw"))
                field("connect").click()
                wait.until(lambda b: text("status").startswith("connected"))

                # Published through /publish, cross-origin (a preflight, then the POST).
                field("pub-channel").clear()
                field("pub-channel").send_keys("shop.orders")
                for payload in ('{"status": "pending", "n": 1}', '{"status": "paid", "n": 2}'):
                    field("pub-payload").clear()
                    field("pub-payload").send_keys(payload)
                    field("publish").click()
                    wait.until(lambda b: text("pub-result") == "published")
                    browser.execute_script("document.getElementById('pub-result').textContent=''")
                wait.until(lambda b: '"n":2' in text("events"))
                assert '"n":1' not in text("events")  # filtered out on the server

                # A refused publish shows the gateway's reason (readable thanks to CORS).
                field("pub-channel").clear()
                field("pub-channel").send_keys("other.x")
                field("publish").click()
                wait.until(lambda b: text("pub-result").startswith("refused: 403"))
                assert "other.x" in text("pub-result")

                # A durable event shows its id, a plain one after it none; line breaks kept.
                event_id = pgherald.publish(conn, "shop.ledger", {"status": "paid", "n": 3})
                wait.until(lambda b: f"#{event_id}" in text("events"))
                pgherald.notify(conn, "shop.orders", '{"status": "paid",\n "n": 4}')
                wait.until(lambda b: '"n": 4' in text("events"))
                rows = browser.find_elements(By.CSS_SELECTOR, "#events li")
                newest = rows[0].text
                assert "shop.orders" in newest, newest
                assert "#" not in newest, newest
                data = rows[0].find_element(By.CSS_SELECTOR, ".data").text
                assert data == '{"status": "paid",\n "n": 4}'

                # The gateway's database connection is cut: a resync notice.
                assert not field("notice").is_displayed()
                _kill(conn, "pgherald-gateway")
                wait.until(lambda b: field("notice").is_displayed())
                assert "may have been missed" in text("notice")
                assert "shop.orders" in text("notice")
                pgherald.notify(conn, "shop.orders", {"status": "paid", "n": 5})
                wait.until(lambda b: '"n":5' in text("events"))

                shot = tmp_path / "gateway-page-cross-origin.png"  # kept for a look after a failure
                assert browser.save_screenshot(str(shot))
                assert shot.stat().st_size > 0
            finally:
                browser.quit()
