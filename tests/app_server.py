"""Inputs for the web-app tests (tiny model, split store, generated folder, reports, summaries),
the app as a real server subprocess on 127.0.0.1, and a headless system Chromium."""
from __future__ import annotations

import csv
import http.cookiejar
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def browser_missing() -> str | None:
    """Why no browser test can run here, or None."""
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        return ("needs Chromium and chromedriver from the system packages "
                "(apt-get install chromium chromium-driver)")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium (pip install -e '.[test]')"
    return None


def make_inputs(tmp: Path, clip_dir: Path, n_reports: int = 20) -> dict[str, Path]:
    """Checkpoint, split store, generated folder, reports CSV and summaries JSONL in ``tmp``."""
    from tcga_store import random_store
    from tiny_ldm import build_tiny_model, save_checkpoint, tiny_model_config

    cfg = tiny_model_config(clip_dir, use_ema=True)
    ckpt = save_checkpoint(build_tiny_model(cfg), tmp / "tiny.ckpt", {"model": cfg})
    store = random_store(tmp / "test.h5", n=12, tile=24, n_slides=2)
    gen = tmp / "generated"
    gen.mkdir()
    rng = np.random.default_rng(1)
    records = []
    for k in range(6):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
            gen / f"{k:05d}.png")
        records.append({"file": f"{k:05d}.png", "tumor": "high", "til": "low"})
    (gen / "metadata.json").write_text(json.dumps({"grid": "grid.png", "images": records}))
    reports = tmp / "reports.csv"
    with reports.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_filename", "text"])
        for i in range(n_reports):
            w.writerow([f"TCGA-R{i:02d}", f"Report {i}: invasive ductal carcinoma, grade {i % 3}."])
    summaries = tmp / "summaries.jsonl"
    with summaries.open("w", encoding="utf-8") as fh:
        for i in range(n_reports):
            for j in range(2):
                fh.write(json.dumps({"report_id": f"TCGA-R{i:02d}", "summary_index": j,
                                     "status": "ok", "text": f"summary {j} of report {i}",
                                     "model": "m", "prompt_version": "v1", "usage": {},
                                     "clip_tokens": 12, "fits": True,
                                     "key_points": f"- point of report {i}"}) + "\n")
    return {"ckpt": ckpt, "store": store, "generated": gen, "reports": reports,
            "summaries": summaries, "workdir": tmp / "app"}


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """``python -m pathldm_app.cli`` as a subprocess; ``kill()`` sends SIGKILL."""

    def __init__(self, inputs: dict[str, Path], study_n: int = 3, extra: list[str] = ()) -> None:
        self.inputs, self.port = inputs, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "pathldm_app.cli", "--port", str(self.port),
                     "--device", "cpu", "--study-n", str(study_n), "--review-fraction", "0.05",
                     *[a for k in ("ckpt", "store", "generated", "reports", "summaries",
                                   "workdir") for a in (f"--{k}", str(inputs[k]))], *extra]
        self.proc: subprocess.Popen | None = None
        self.log = inputs["workdir"].parent / "server.log"

    def start(self, timeout: float = 60.0) -> AppServer:
        """Start and wait until /health answers."""
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        with self.log.open("a") as log:
            self.proc = subprocess.Popen(self.args, cwd=ROOT, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n"
                                   f"{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        raise TimeoutError(f"server did not start:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """SIGKILL, as a crash or power cut of the process would."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        """Terminate gracefully."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


class HttpReader:
    """A second reader as a plain HTTP client with its own cookie jar."""

    def __init__(self, base: str, name: str) -> None:
        self.base = base
        self.opener = urllib.request.build_opener(
            urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
        self.post("/login", {"name": name, "next": "/"})

    def get(self, path: str) -> Any:
        """Response of a GET (read it within a ``with``)."""
        return self.opener.open(self.base + path, timeout=30)

    def post(self, path: str, data: dict[str, Any]) -> str:
        """POST a form, follow redirects; returns the final URL."""
        body = urllib.parse.urlencode(data).encode()
        with self.opener.open(self.base + path, data=body, timeout=30) as r:
            return r.geturl()


def chrome(width: int = 1100, height: int = 800) -> Any:
    """Headless system Chromium through Selenium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    driver.implicitly_wait(0)
    return driver


def cookie_opener(driver: Any) -> urllib.request.OpenerDirector:
    """An HTTP client carrying the browser's session cookie (for downloads)."""
    cookies = "; ".join(f"{c['name']}={c['value']}" for c in driver.get_cookies())
    opener = urllib.request.build_opener()
    opener.addheaders = [("Cookie", cookies)]
    return opener
