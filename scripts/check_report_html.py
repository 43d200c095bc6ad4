#!/usr/bin/env python3
"""Render reports/report.html with headless Chromium and check that it shows what it should.

    python scripts/check_report_html.py [reports/report.html] [--out DIR] [--chromium PATH]

Prints one line (OK or FAIL and why) and exits 0 when the page passes, 1 when it fails, 2 when it
cannot be checked (no such file, no Chromium). The screenshots are kept in --out (default: a new
temporary folder, named in the verdict) for a person to look at.

How the check works (it locates every figure and compares pixels, not just "is it colourful"):

1. The HTML must be self-contained: every <img> has a PNG data URI, and no src/href, CSS url(),
   @import, script, link or frame points anywhere (the report is read offline).
2. Layout: a copy of the page with one added script (the report itself has none) is loaded with
   `chromium --dump-dom` at the same window width; on load the script writes the page height and
   every <img>'s box (getBoundingClientRect, in page coordinates) into the DOM. One cheap run.
3. The real, unmodified page is screenshotted with a window as tall as the page (1280 wide by
   default), so the whole page is on the one PNG. It must not be blank: at least 2 % of its
   pixels differ from the background colour and it has at least 64 distinct colours.
4. For each figure, the screenshot's pixels inside its box must show that figure: the source PNG
   (composited on white, resized to the box) and the crop must correlate (Pearson r of the grey
   levels >= --min-correlation, default 0.6; a nearly uniform figure is compared by mean absolute
   difference instead). A figure that does not decode (Chromium's broken-image icon), is hidden,
   transparent, covered by something else, clipped, drawn mirrored/rotated or has no box fails.
5. The review reads top down: the first section (<h2>) is the verdict, and it starts within the
   first screen (--first-screen px, default 900), where a reviewer looks first.

--top FILE keeps the first screen of the screenshot as a PNG (the README's picture of the report).
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

IMG = re.compile(r"<img\b[^>]*>", re.IGNORECASE)
SRC = re.compile(r'\bsrc\s*=\s*"([^"]*)"', re.IGNORECASE)
DATA_PNG = re.compile(r"^data:image/png;base64,([A-Za-z0-9+/=\s]+)$")
REFS = re.compile(r"""\b(?:src|href|action|poster|data)\s*=\s*["']?([^"'\s>]*)|url\(\s*["']?([^"')]*)|@import""",
                  re.IGNORECASE)
LAYOUT_SCRIPT = """<script>addEventListener("load", () => {
  const boxes = [...document.images].map(i => { const b = i.getBoundingClientRect();
    return [b.left + scrollX, b.top + scrollY, b.width, b.height]; });
  const out = document.createElement("pre"); out.id = "dkgm-layout";
  const h2 = [...document.querySelectorAll("h2")].map(h => [h.textContent.trim(), h.getBoundingClientRect().top + scrollY]);
  out.textContent = JSON.stringify({height: document.documentElement.scrollHeight, boxes: boxes, sections: h2});
  document.body.appendChild(out);
});</script>"""
LAYOUT_OUT = re.compile(r'<pre id="dkgm-layout">([^<]*)</pre>')
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium(explicit: str | None) -> str | None:
    if explicit:
        return explicit if shutil.which(explicit) or Path(explicit).is_file() else None
    env = os.environ.get("CHROMIUM")
    if env and (shutil.which(env) or Path(env).is_file()):
        return env
    return next((shutil.which(n) for n in CHROMIUM_NAMES if shutil.which(n)), None)


def chromium_cmd(chromium: str, width: int, height: int, profile: Path) -> list[str]:
    return [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
            "--force-device-scale-factor=1", "--no-first-run", "--disable-background-networking", "--disable-sync",
            "--disable-component-update", "--disable-extensions", f"--user-data-dir={profile}",
            f"--window-size={width},{height}"]


def layout(chromium: str, page: Path, width: int, height: int, profile: Path) -> dict:
    """Page height and every image's box, measured by Chromium on an instrumented copy."""
    proc = subprocess.run([*chromium_cmd(chromium, width, height, profile), "--dump-dom", page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=180, check=False)
    found = LAYOUT_OUT.search(proc.stdout)
    if not found:
        tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"chromium reported no layout (exit {proc.returncode}): {tail[0]}")
    return json.loads(html.unescape(found.group(1)))


def screenshot(chromium: str, page: Path, out: Path, width: int, height: int, profile: Path) -> np.ndarray:
    cmd = [*chromium_cmd(chromium, width, height, profile), f"--screenshot={out}", page.resolve().as_uri()]
    if out.exists():
        out.unlink()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
    if not out.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): {tail[0]}")
    with Image.open(out) as im:
        return np.asarray(im.convert("RGB"))


def grey(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0


def compare(source: Image.Image, crop: np.ndarray) -> tuple[bool, float, str]:
    """Whether `crop` shows `source`: Pearson r of grey levels (or mean abs. difference if uniform)."""
    rgba = source.convert("RGBA")
    flat = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    flat.alpha_composite(rgba)
    h, w = crop.shape[:2]
    ref = grey(np.asarray(flat.convert("RGB").resize((w, h), Image.BILINEAR)))
    got = grey(crop)
    if ref.std() < 0.02:
        mad = float(np.abs(ref - got).mean())
        return mad < 0.05, 1.0 - mad, f"uniform figure, mean abs. difference {mad:.3f}"
    if got.std() < 1e-6:
        return False, 0.0, "the box is uniform"
    r = float(np.corrcoef(ref.ravel(), got.ravel())[0, 1])
    return r >= 0.0, r, f"r = {r:.3f}"


def external_refs(text: str) -> list[str]:
    bad = []
    for m in REFS.finditer(text):
        ref = m.group(1) if m.group(1) is not None else m.group(2)
        if ref is None:  # @import
            bad.append("@import")
        elif ref and not ref.startswith(("data:", "#")):
            bad.append(ref[:60])
    if re.search(r"https?://", text, re.IGNORECASE):
        bad.append("an http(s):// address")
    if re.search(r"<script\b|<link\b|<iframe\b|<object\b|<embed\b", text, re.IGNORECASE):
        bad.append("a script/link/iframe/object/embed element")
    return bad


VERDICT = "Verdict"


def check(html_path: Path, out_dir: Path, chromium: str, width: int, height: int, max_height: int,
          min_correlation: float, first_screen: int = 900, top_png: Path | None = None) -> tuple[bool, str]:
    text = html_path.read_text(encoding="utf-8")
    bad = external_refs(text)
    if bad:
        return False, f"not self-contained: {', '.join(sorted(set(bad)))}"
    sources: list[Image.Image] = []
    for i, tag in enumerate(IMG.findall(text)):
        src = SRC.search(tag)
        data = DATA_PNG.match(src.group(1)) if src else None
        if data is None:
            return False, f"figure {i + 1}: <img> without a PNG data URI"
        try:
            img = Image.open(io.BytesIO(base64.b64decode(data.group(1), validate=False)))
            img.load()
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a broken figure
            return False, f"figure {i + 1}: its data URI is not a readable PNG ({exc})"
        sources.append(img)

    out_dir.mkdir(parents=True, exist_ok=True)
    probe = out_dir / "layout.html"
    probe.write_text(text.replace("</body>", LAYOUT_SCRIPT + "</body>", 1) if "</body>" in text
                     else text + LAYOUT_SCRIPT, encoding="utf-8")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        geometry = layout(chromium, probe, width, height, Path(profile))
        page_height = math.ceil(geometry["height"])
        if page_height > max_height:
            return False, f"the page is {page_height} px tall, more than --max-height {max_height}"
        height = max(height, page_height)
        shot = screenshot(chromium, html_path, out_dir / "screenshot.png", width, height, Path(profile))
    sections = geometry.get("sections") or []
    if not sections or sections[0][0] != VERDICT:
        first = sections[0][0] if sections else "none"
        return False, f"the first section is {first!r}, not the verdict ({VERDICT!r})"
    if sections[0][1] > first_screen:
        return False, f"the verdict starts {sections[0][1]:.0f} px down, below the first screen ({first_screen} px)"
    if top_png is not None:
        top_png.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(shot[:first_screen]).save(top_png, format="PNG", optimize=True)
    boxes = geometry["boxes"]
    if len(boxes) != len(sources):
        return False, f"chromium laid out {len(boxes)} images, the HTML has {len(sources)}"

    # not blank
    packed = (shot[:, :, 0].astype(np.uint32) << 16) | (shot[:, :, 1].astype(np.uint32) << 8) | shot[:, :, 2]
    counts = np.bincount(packed.ravel(), minlength=1 << 24)
    n_colours = int(np.count_nonzero(counts))
    bg = int(counts.argmax())
    diff = sum(np.abs(shot[:, :, c].astype(np.int16) - ((bg >> (16 - 8 * c)) & 255)) for c in range(3))
    content = float((diff > 24).mean())
    where = f"{width}x{height} px, screenshot {out_dir / 'screenshot.png'}"
    if content < 0.02 or n_colours < 64:
        return False, f"the page looks blank: {100 * content:.1f}% non-background, {n_colours} colours ({where})"

    # every figure drawn in its box, showing its own pixels
    scores, failures = [], []
    for i, (src, (left, top, w, h)) in enumerate(zip(sources, boxes)):
        x0, y0 = math.ceil(left), math.ceil(top)
        x1, y1 = min(int(left + w), shot.shape[1]), min(int(top + h), shot.shape[0])
        if x1 - x0 < 4 or y1 - y0 < 4:
            failures.append(f"figure {i + 1} has no box on the page ({w:.0f}x{h:.0f} at x={left:.0f}, y={top:.0f})")
            continue
        ok, score, why = compare(src, shot[y0:y1, x0:x1])
        scores.append(score)
        if not ok or score < min_correlation:
            failures.append(f"figure {i + 1} ({x1 - x0}x{y1 - y0} px at y={y0}) does not show its image: {why}")
    if failures:
        return False, "; ".join(failures) + f" ({where})"
    best = f", lowest figure correlation {min(scores):.3f}" if scores else " (the page has no figures)"
    return True, (f"{len(sources)} figures visible{best}; {100 * content:.1f}% of the page non-background, "
                  f"{n_colours} colours ({where})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("html", nargs="?", default="reports/report.html", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="folder for the screenshots (default: a new temp folder)")
    ap.add_argument("--chromium", default=None, help="browser binary (default: chromium on PATH, or $CHROMIUM)")
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=4000, help="least window height (raised to the page's height)")
    ap.add_argument("--max-height", type=int, default=32000)
    ap.add_argument("--min-correlation", type=float, default=0.6)
    ap.add_argument("--first-screen", type=int, default=900, help="the verdict must start within this many px")
    ap.add_argument("--top", type=Path, default=None, help="also write the first screen of the page as a PNG")
    args = ap.parse_args(argv)
    if not args.html.is_file():
        print(f"check_report_html: cannot check: {args.html} not found", file=sys.stderr)
        return 2
    chromium = find_chromium(args.chromium)
    if chromium is None:
        print("check_report_html: cannot check: no chromium binary (apt-get install chromium, or pass --chromium)",
              file=sys.stderr)
        return 2
    out = args.out or Path(tempfile.mkdtemp(prefix="report-check-"))
    try:
        ok, message = check(args.html, out, chromium, args.width, args.height, args.max_height, args.min_correlation,
                            args.first_screen, args.top)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"check_report_html: FAIL: {exc}")
        return 1
    print(f"check_report_html: {'OK' if ok else 'FAIL'}: {args.html}: {message}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
