"""Headless Chromium driven over the Chrome DevTools Protocol, for the dashboard tests.

Chromium is started with a fresh profile and `--remote-debugging-port=0`; the port it picked
is read from DevToolsActivePort in the profile. The page target's websocket is driven with
aiohttp's client: evaluate JavaScript, wait for a condition, take a screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--disable-default-apps", "--mute-audio", "--window-size=1400,1100"]


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def artifacts_dir() -> Path:
    path = Path(os.environ.get("MARDUK_TEST_ARTIFACTS", "/tmp/marduk-test-artifacts"))
    path.mkdir(parents=True, exist_ok=True)
    return path


class Browser:
    """One headless Chromium showing one page."""

    def __init__(self, binary: str, url: str) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="marduk-chromium-"))
        self.proc = subprocess.Popen(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}",
             "--remote-debugging-port=0", url],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ws_url = self._page_socket(url)
        self._ids = itertools.count(1)

    def _page_socket(self, url: str, timeout_s: float = 30.0) -> str:
        deadline = time.monotonic() + timeout_s
        port_file = self.profile / "DevToolsActivePort"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited {self.proc.returncode}")
            if port_file.exists() and port_file.read_text().strip():
                port = port_file.read_text().split()[0]
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as resp:
                    targets = json.load(resp)
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    return str(pages[0]["webSocketDebuggerUrl"])
            time.sleep(0.1)
        raise RuntimeError("chromium's DevTools endpoint did not come up")

    async def _call(self, ws: aiohttp.ClientWebSocketResponse, method: str,
                    params: dict[str, Any] | None = None) -> dict[str, Any]:
        ident = next(self._ids)
        await ws.send_json({"id": ident, "method": method, "params": params or {}})
        while True:
            msg = await ws.receive_json(timeout=30)
            if msg.get("id") == ident:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return dict(msg.get("result", {}))

    async def _session(self, *calls: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
        async with aiohttp.ClientSession() as session, \
                session.ws_connect(self.ws_url, max_msg_size=64 * 2**20) as ws:
            return [await self._call(ws, method, params) for method, params in calls]

    def evaluate(self, expression: str) -> Any:
        [result] = asyncio.run(self._session(
            ("Runtime.evaluate", {"expression": expression, "returnByValue": True})))
        if "exceptionDetails" in result:
            raise RuntimeError(f"page error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout_s: float = 20.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout_s
        last_error = ""
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except RuntimeError as exc:  # the page is still loading
                last_error = str(exc)
                value = None
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what or expression}"
                             f"{'; last error: ' + last_error if last_error else ''}")

    def screenshot(self, path: Path, *, whole_page: bool = True) -> Path:
        """A PNG of the page: all of it, or (whole_page=False) the viewport, for a page whose
        scrolling table is taller than Chromium will capture in one image."""
        [shot] = asyncio.run(self._session(
            ("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": whole_page})))
        path.write_bytes(base64.b64decode(shot["data"]))
        return path

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)
