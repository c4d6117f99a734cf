"""Builds the docs and looks at them in headless Chromium, as a reader would.

    python docs/screenshot.py [--out DIR] [PAGE ...]

1. Puts MathJax 3 into ``docs/_static/mathjax/`` (from the npm registry, once), so
   that the built pages render math with no network (``conf.py`` picks it up).
2. Builds the HTML with ``sphinx-build -W``.
3. Opens each page (default: a set that covers math, docstrings, tables and figures)
   in headless Chromium, waits until MathJax has typeset it, and
   - counts the formulas left as TeX source, and fails if there is any;
   - scrolls through the page and saves what the window shows, 1280 x 2000 pixels at a
     time, each overlapping the one before by 200: ``DIR/<page>-1.png``,
     ``DIR/<page>-2.png``, ... (default DIR: ``/tmp/optax_logdamp_screenshots``), to be
     looked at.

Chromium is driven over the DevTools protocol on a pipe, so nothing beyond the
standard library is needed in Python. Needs ``chromium`` (Debian: ``apt-get install
chromium``) and, the first time, ``npm``. Not run in CI: it is the check a person
does before a docs change lands.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
MATHJAX = DOCS / "_static" / "mathjax" / "tex-svg.js"
MATHJAX_PACKAGE = "mathjax@3.2.2"
HTML = DOCS / "_build" / "html"
PAGES = [
    "index",
    "getting_started",
    "guide/log_dampen",
    "guide/alrc",
    "guide/data_parallel",
    "guide/diagnostics",
    "guide/choosing",
    "api",
    "benchmarks/index",
    "benchmarks/lm",
    "benchmarks/spike_results",
    "changelog",
]
WIDTH, HEIGHT, OVERLAP = 1280, 2000, 200
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    f"--window-size={WIDTH},{HEIGHT}",
]
# Resolves once the page has loaded and MathJax (if the page loads it) has typeset it.
READY = """new Promise(resolve => {
  const typeset = () => (window.MathJax?.startup?.promise ?? Promise.resolve()).then(
      () => resolve(true));
  if (document.readyState === "complete") typeset();
  else window.addEventListener("load", typeset);
})"""
# Sphinx puts each formula in an element of class "math"; MathJax adds an
# <mjx-container> inside it.
MATH = """({
  formulas: document.querySelectorAll(".math").length,
  raw: [...document.querySelectorAll(".math")].filter(
      e => !e.querySelector("mjx-container")).length,
  height: Math.max(document.body.scrollHeight, document.documentElement.scrollHeight),
})"""
NEXT_FRAME = "new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"


def vendor_mathjax() -> None:
    """MathJax's single-file SVG build (fonts inside), from the npm package."""
    if MATHJAX.exists():
        return
    with tempfile.TemporaryDirectory() as scratch:
        subprocess.run(
            ["npm", "pack", MATHJAX_PACKAGE, "--pack-destination", scratch],
            check=True,
            capture_output=True,
        )
        (tarball,) = Path(scratch).glob("mathjax-*.tgz")
        with tarfile.open(tarball) as archive:
            member = archive.extractfile("package/es5/tex-svg.js")
            assert member is not None
            MATHJAX.parent.mkdir(parents=True, exist_ok=True)
            MATHJAX.write_bytes(member.read())
    print(f"MathJax ({MATHJAX_PACKAGE}) -> {MATHJAX.relative_to(DOCS.parent)}")


def build() -> None:
    subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "-q", "-b", "html", str(DOCS), str(HTML)],
        check=True,
    )


class Chromium:
    """Headless Chromium, one tab, driven over the DevTools protocol on a pipe."""

    def __init__(self) -> None:
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        if binary is None:
            sys.exit("chromium not found (Debian: apt-get install chromium)")
        self._profile = tempfile.TemporaryDirectory()
        # --remote-debugging-pipe: Chromium reads commands from fd 3, answers on fd 4.
        commands_in, self._commands = os.pipe()
        self._answers, answers_out = os.pipe()
        self._process = subprocess.Popen(
            [
                "sh",
                "-c",
                f'exec "$0" "$@" 3<&{commands_in} 4>&{answers_out}',
                binary,
                *CHROMIUM_FLAGS,
                "--remote-debugging-pipe",
                f"--user-data-dir={self._profile.name}",
                "about:blank",
            ],
            pass_fds=(commands_in, answers_out),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(commands_in)
        os.close(answers_out)
        self._pending = b""
        self._last_id = 0
        target = self._send("Target.createTarget", url="about:blank")["targetId"]
        self._session = self._send("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.tab(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )

    def _send(self, method: str, session: str | None = None, **params: Any) -> dict:
        self._last_id += 1
        message: dict[str, Any] = {"id": self._last_id, "method": method, "params": params}
        if session is not None:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:  # events and other answers are skipped
            while b"\0" not in self._pending:
                chunk = os.read(self._answers, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._pending += chunk
            raw, self._pending = self._pending.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._last_id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer["result"]

    def tab(self, method: str, **params: Any) -> dict:
        return self._send(method, session=self._session, **params)

    def evaluate(self, expression: str) -> Any:
        result = self.tab(
            "Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.tab("Page.navigate", url=url)
        while self.evaluate("location.href") != url:  # the old document may answer first
            pass
        self.evaluate(READY)

    def screenshot(self, top: int, path: Path) -> None:
        self.evaluate(f"window.scrollTo(0, {top})")
        self.evaluate(NEXT_FRAME)
        path.write_bytes(base64.b64decode(self.tab("Page.captureScreenshot")["data"]))

    def close(self) -> None:
        try:
            self._send("Browser.close")
        except RuntimeError:
            pass  # it closed the pipe on its way out
        self._process.wait(timeout=60)
        os.close(self._commands)
        os.close(self._answers)
        self._profile.cleanup()


def check_page(browser: Chromium, page: str, out: Path) -> bool:
    """Screenshots of one page; True if every formula on it was typeset."""
    browser.open((HTML / f"{page}.html").as_uri())
    math = browser.evaluate(MATH)
    stem = page.replace("/", "_")
    shots = []
    last_top = max(math["height"] - HEIGHT, 0)
    for number, top in enumerate(range(0, last_top + HEIGHT - OVERLAP, HEIGHT - OVERLAP), start=1):
        shots.append(out / f"{stem}-{number}.png")
        browser.screenshot(top, shots[-1])
    ok = math["raw"] == 0
    status = "ok" if ok else f"{math['raw']} LEFT AS TEX"
    print(
        f"{page:26} formulas {math['formulas']:3}  {status:14} {shots[0]}"
        + (f" .. -{len(shots)}.png" if len(shots) > 1 else "")
    )
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pages", nargs="*", default=PAGES)
    parser.add_argument("--out", type=Path, default=Path("/tmp/optax_logdamp_screenshots"))
    args = parser.parse_args()
    vendor_mathjax()
    build()
    args.out.mkdir(parents=True, exist_ok=True)
    browser = Chromium()
    try:
        results = [check_page(browser, page, args.out) for page in args.pages]
    finally:
        browser.close()
    if not all(results):
        sys.exit("some pages show math as TeX source")


if __name__ == "__main__":
    main()
