"""Open a `raysys report` page in headless Chromium, take a full-page screenshot, and check that every plot is
drawn: the screenshot's pixels inside each plot's box are not blank.

    python benchmarks/report_check.py runs/report.html [--screenshot docs/report.png]

Needs Debian's `chromium` package (`apt-get install chromium`); this script installs nothing. How it finds the
plots without putting JavaScript in the report: a copy of the page gets one script that writes the box
(CSS pixels) of the SVG in each `<figure class="plot">` and the page height into the DOM, which `chromium --dump-dom`
prints; the report itself is screenshotted unchanged, at that height, with a device scale of 1, so CSS
pixels are screenshot pixels. A plot passes when at least `--min-ink` of its box is not background
(pixels darker than 245/255) and its pixel values vary. Last stdout line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
PROBE = """<script>
window.addEventListener('load', () => {
  const boxes = {};
  document.querySelectorAll('figure.plot').forEach(f => {
    const r = (f.querySelector('svg') || f).getBoundingClientRect();
    boxes[f.id] = [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height];
  });
  const out = document.createElement('pre');
  out.id = 'raysys-probe';
  out.textContent = JSON.stringify({boxes: boxes, width: document.documentElement.scrollWidth,
                                    height: document.documentElement.scrollHeight});
  document.body.appendChild(out);
});
</script>"""


def find_browser() -> str | None:
    return next((p for p in map(shutil.which, BROWSERS) if p), None)


def _chromium(browser: str, width: int, height: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
           "--disable-extensions", "--force-device-scale-factor=1", "--virtual-time-budget=5000",
           f"--window-size={width},{height}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def probe_layout(browser: str, report: Path, width: int) -> dict:
    """Each plot's box and the page size, as Chromium lays the page out at `width` CSS pixels."""
    html = report.read_text(encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="report-probe-") as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(html.replace("</body>", PROBE + "</body>", 1), encoding="utf-8")
        out = _chromium(browser, width, 2000, "--dump-dom", probe.as_uri())
    m = re.search(r'<pre id="raysys-probe">(.*?)</pre>', out.stdout, re.S)
    if not m:
        raise RuntimeError(f"chromium --dump-dom gave no layout (rc {out.returncode}): {out.stderr[-500:]}")
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def screenshot(browser: str, report: Path, width: int, height: int, png: Path) -> np.ndarray:
    from PIL import Image

    out = _chromium(browser, width, height, f"--screenshot={png}", report.resolve().as_uri())
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (rc {out.returncode}): {out.stderr[-500:]}")
    return np.asarray(Image.open(png).convert("L"))


def ink(gray: np.ndarray, box: list[float]) -> dict:
    x, y, w, h = (int(round(v)) for v in box)
    crop = gray[max(0, y):y + h, max(0, x):x + w]
    inside = crop.size > 0 and y + h <= gray.shape[0] and x + w <= gray.shape[1]
    frac = float((crop < 245).mean()) if crop.size else 0.0
    std = float(crop.std()) if crop.size else 0.0
    return {"box": [x, y, w, h], "inside_screenshot": bool(inside), "ink_fraction": round(frac, 4),
            "pixel_std": round(std, 2)}


def save_small(png: Path, dest: Path, max_bytes: int, width: int) -> int:
    """The screenshot scaled to `width` and palette-quantised until it is under `max_bytes`."""
    from PIL import Image

    im = Image.open(png).convert("RGB")
    while True:
        small = im.resize((width, round(im.height * width / im.width)), Image.LANCZOS)
        small.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(dest, optimize=True)
        if dest.stat().st_size <= max_bytes or width <= 300:
            return dest.stat().st_size
        width = int(width * 0.85)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", type=Path, help="the HTML file `raysys report` wrote")
    ap.add_argument("--width", type=int, default=1300, help="viewport width in CSS pixels")
    ap.add_argument("--min-ink", type=float, default=0.02, help="share of a plot's box that must be drawn")
    ap.add_argument("--screenshot", type=Path, help="also save the full-page screenshot here, scaled down")
    ap.add_argument("--screenshot-max-kb", type=int, default=480)
    ap.add_argument("--screenshot-width", type=int, default=900)
    args = ap.parse_args()
    browser = find_browser()
    if browser is None:
        print(json.dumps({"error": "no headless Chromium found (looked for " + ", ".join(BROWSERS) + "): install "
                          "Debian's package with `sudo apt-get install chromium`; this script installs nothing"}))
        sys.exit(2)
    if not args.report.is_file():
        print(json.dumps({"error": f"{args.report}: no such report; write one with `raysys report RUN_DIR -o ...`"}))
        sys.exit(2)
    t0 = time.perf_counter()
    version = subprocess.run([browser, "--version"], capture_output=True, text=True).stdout.strip()
    layout = probe_layout(browser, args.report, args.width)
    with tempfile.TemporaryDirectory(prefix="report-shot-") as tmp:
        png = Path(tmp) / "page.png"
        gray = screenshot(browser, args.report, args.width, int(layout["height"]), png)
        plots = {k.removeprefix("plot-"): ink(gray, box) for k, box in sorted(layout["boxes"].items())}
        for p in plots.values():
            p["drawn"] = p["inside_screenshot"] and p["ink_fraction"] >= args.min_ink and p["pixel_std"] > 5
        saved = None
        if args.screenshot:
            args.screenshot.parent.mkdir(parents=True, exist_ok=True)
            saved = {"path": str(args.screenshot),
                     "bytes": save_small(png, args.screenshot, args.screenshot_max_kb * 1024, args.screenshot_width)}
    ok = bool(plots) and all(p["drawn"] for p in plots.values())
    print(json.dumps({"report": str(args.report), "report_bytes": args.report.stat().st_size, "browser": version,
                      "page_px": [int(layout["width"]), int(layout["height"])], "screenshot_px": list(gray.shape[::-1]),
                      "num_plots": len(plots), "all_plots_drawn": ok,
                      "blank_plots": sorted(k for k, p in plots.items() if not p["drawn"]), "plots": plots,
                      "screenshot": saved, "seconds": round(time.perf_counter() - t0, 2)}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
