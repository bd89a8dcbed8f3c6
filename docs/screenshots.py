"""Take the screenshots of docs/dashboard.md: a real TensorBoard on 127.0.0.1, a real headless Chromium.

    python docs/screenshots.py LOGDIR [--out docs/img] [--prefix demo] [--first-screen-only]

LOGDIR is a gradwatch run folder (``make demo`` writes runs/demo; docs/example_runs.py the Lightning run and the
run with a mid-run fault). The window is 1600 x 1000, TensorBoard's defaults untouched (the run list open,
smoothing 0.6): ``<prefix>-first-screen.png`` is what a user sees on opening Time Series; with ``--pinned``,
``<prefix>-pinned-first-screen.png`` is the same through the link ``gradwatch report`` and the Lightning callback
give (the user's first two charts pinned, gradwatch.sinks.tensorboard.link). Needs ``playwright`` (``pip install
playwright``; not a gradwatch dependency) and a Chromium on the machine (``apt-get install chromium``;
playwright's own download is not used). TensorBoard draws its line charts with WebGL in a worker, which a
GPU-less headless browser leaves blank, so the pages are opened with TensorBoard's ``forceSVG=true``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(logdir: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    exe = os.path.join(os.path.dirname(sys.executable), "tensorboard")
    proc = subprocess.Popen([exe, "--logdir", logdir, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            urllib.request.urlopen(url + "/data/plugins_listing", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("tensorboard did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("logdir")
    ap.add_argument("--out", default="docs/img")
    ap.add_argument("--prefix", default="demo")
    ap.add_argument("--filter", default="", help="a regex for a filtered-tags shot (none by default)")
    ap.add_argument("--first-screen-only", action="store_true", help="only the first screen of Time Series")
    ap.add_argument("--pinned", action="store_true", help="also the first screen through gradwatch's pin link")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    os.makedirs(args.out, exist_ok=True)
    proc, url = _serve(args.logdir)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1600, "height": 1000})

            def shot(name: str, path: str, wait: float = 6.0, full: bool = False, tags: str = "",
                     side_pane: bool = True, actual_size: bool = False) -> None:
                page.goto(f"{url}/?forceSVG=true{path}")
                page.wait_for_load_state("networkidle")
                time.sleep(wait)
                close = page.locator("button[aria-label='Close side pane']")
                if not side_pane and close.count() and close.first.is_visible():
                    close.first.click(timeout=5000)
                    time.sleep(1)
                if actual_size:  # the one click docs/dashboard.md tells: the pictures at their own size
                    box = page.get_by_text("Show actual image size")
                    visible = [box.nth(i) for i in range(box.count()) if box.nth(i).is_visible()]
                    if visible:
                        visible[0].click(timeout=5000)
                        time.sleep(3)
                    else:
                        print("no visible 'Show actual image size' control: shot at the default size")
                if tags:  # what a user types in the tag filter
                    box = page.locator("input[placeholder='Filter tags (regex)']").first
                    box.fill(tags)
                    box.press("Escape")  # close the autocomplete list over the cards
                    page.mouse.click(700, 140)
                    time.sleep(wait)
                page.screenshot(path=os.path.join(args.out, f"{args.prefix}-{name}.png"), full_page=full)
                print("wrote", os.path.join(args.out, f"{args.prefix}-{name}.png"))

            shot("first-screen", "#timeseries", wait=10)
            if args.pinned:  # the link of `gradwatch report LOGDIR`, on this server
                from gradwatch.report import summarize
                from gradwatch.sinks.tensorboard.link import pin_link

                link = pin_link([t for r in summarize(args.logdir) for t in r.own_scalars], address=url)
                if link is None:
                    print("no charts of the user's to pin: no pinned shot")
                else:
                    shot("pinned-first-screen", "&" + link.split("?", 1)[1], wait=10)
            if not args.first_screen_only:
                if args.filter:
                    shot("filtered", "#timeseries", tags=args.filter, side_pane=False)
                shot("custom-scalars", "#custom_scalars", wait=8, side_pane=False)
                shot("images", "#images", wait=8, actual_size=True)
            browser.close()
    finally:
        proc.terminate()


if __name__ == "__main__":
    main()
