"""`hymirec dashboard` in a real browser: headless Debian Chromium over the DevTools protocol.

Chromium's own ``--screenshot`` fires before Streamlit has rendered anything, so the test drives
the page over DevTools, waits until the vega-lite charts are drawn (``canvas`` or ``svg.marks``
inside ``.vega-embed``) and the SRM warning is on the page, then captures a screenshot. Set
``SAVE_DASHBOARD_PNG=1`` to keep a copy in ``benchmarks/dashboard.png``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from websockets.sync.client import ClientConnection, connect

from core.settings import Settings
from hymirec.processes import ServiceProcess
from tests.conftest import REPO_ROOT, free_port, wait_until
from tests.dashboard.conftest import BROKEN, Published

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason="needs Debian's chromium at /usr/bin/chromium (scripts/setup.sh --dev installs it)",
    ),
]

# Vega draws into a canvas (or an svg.marks); a non-empty canvas has non-transparent pixels.
CHARTS_DRAWN_JS = """
(() => {
  const charts = [...document.querySelectorAll('.vega-embed canvas, .vega-embed svg.marks')];
  const drawn = charts.filter(c => {
    if (c.tagName.toLowerCase() !== 'canvas') return c.childElementCount > 0;
    if (!c.width || !c.height) return false;
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
    for (let i = 3; i < d.length; i += 4) if (d[i] > 0) return true;
    return false;
  });
  return drawn.length;
})()
"""


CONTENT_HEIGHT_JS = """
(() => {
  const main = document.querySelector('[data-testid="stMain"]') || document.body;
  return main.scrollHeight;
})()
"""


class DevTools:
    """A minimal Chrome DevTools Protocol client: one call at a time, results by id."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws, self.next_id = ws, 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("id") == self.next_id:
                assert "error" not in message, f"{method}: {message['error']}"
                result: dict[str, Any] = message["result"]
                return result

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")


def http_json(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return json.loads(response.read())
    except (OSError, ValueError):
        return None


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@contextmanager
def chromium(profile: Path, debug_port: int) -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            f"--remote-debugging-port={debug_port}",
            "--window-size=1400,3000",
            "about:blank",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the renderers go with it
    )
    try:
        yield process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def page_websocket(debug_port: int) -> str | None:
    targets = http_json(f"http://127.0.0.1:{debug_port}/json/list") or []
    pages = [t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"]
    return pages[0] if pages else None


def test_dashboard_charts_render_in_chromium(published: Published, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    shutil.copytree(published.folder, data_dir / "readouts")
    settings = Settings(data_dir=data_dir, dashboard_port=free_port(), serve_port=free_port())
    url = f"http://127.0.0.1:{settings.dashboard.port}"
    debug_port = free_port()
    with ServiceProcess("dashboard", ["dashboard"], settings) as dashboard:
        wait_until(
            lambda: http_ok(f"{url}/_stcore/health") or not dashboard.alive(),
            120,
            "the dashboard to answer",
        )
        assert dashboard.alive(), dashboard.tail()
        with chromium(tmp_path / "profile", debug_port):
            ws_url = wait_until(lambda: page_websocket(debug_port), 60, "Chromium's DevTools")
            with connect(ws_url, max_size=None, open_timeout=30) as ws:
                png = capture(DevTools(ws), url)
        dashboard.stop()
    assert len(png) > 50_000
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.width == 1400 and image.height >= 1500
    colors = image.getcolors(maxcolors=1 << 20) or []
    assert len(colors) > 500, "the screenshot is nearly uniform"
    assert max(count for count, _ in colors) < 0.95 * image.width * image.height
    if os.environ.get("SAVE_DASHBOARD_PNG"):
        (REPO_ROOT / "benchmarks" / "dashboard.png").write_bytes(png)


def capture(cdp: DevTools, url: str) -> bytes:
    """Open the dashboard, pick the broken experiment, wait for its charts, screenshot it all."""
    cdp.call(
        "Emulation.setDeviceMetricsOverride",
        width=1400,
        height=3000,
        deviceScaleFactor=1,
        mobile=False,
    )
    cdp.call("Page.navigate", url=url)
    click = f"""
    (() => {{
      const label = [...document.querySelectorAll('[data-testid="stSidebar"] label')]
        .find(l => l.innerText.includes({json.dumps(BROKEN)}));
      if (label) label.click();
      return Boolean(label);
    }})()
    """
    wait_until(lambda: cdp.evaluate(click), 90, "the experiment list in the sidebar")
    wait_until(
        lambda: "Sample ratio mismatch" in (cdp.evaluate("document.body.innerText") or ""),
        90,
        "the SRM warning",
    )
    wait_until(lambda: (cdp.evaluate(CHARTS_DRAWN_JS) or 0) >= 6, 90, "six drawn charts")
    # Layout settles once every chart is drawn: the same content height twice in a row.
    heights: list[int] = []

    def settled() -> bool:
        heights.append(int(cdp.evaluate(CONTENT_HEIGHT_JS)))
        return len(heights) > 1 and heights[-1] == heights[-2]

    wait_until(settled, 30, "the page to settle", every_s=0.5)
    shot = cdp.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)
    return base64.b64decode(shot["data"])
