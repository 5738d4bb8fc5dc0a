"""Generation jobs: one worker thread runs queued requests with the project's DDIM sampling.

The model is loaded as ``scripts/sample.py`` loads it (:func:`ldm.checkpoint.load_model`, EMA
weights when the checkpoint has them), captions come from :mod:`ldm.data.captions`, images
from :func:`ldm.evaluation.sampling.generate_to_folder` with per-image seeds. Each job writes
``OUTDIR/<job>/{00000.png, ..., grid.png, metadata.json}`` in sample.py's layout, so its folder
can go straight to FID or the reader study. Jobs are recorded in the database; queued or
interrupted ones are run again after a restart (finished images are kept).
"""
from __future__ import annotations

import io
import logging
import math
import queue
import secrets
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ldm.data.captions import caption_from_levels, class_label_from_levels
from pathldm_app.storage import Database

logger = logging.getLogger(__name__)

LEVELS = ("low", "high")
LIMITS = {"steps": (1, 1000), "n": (1, 64), "seed": (0, 2**31 - 1)}
MAX_SCALE = 50.0


@dataclass
class ModelSpec:
    """Which model to load and where to run it."""

    ckpt: str
    config: list[str] | None = None
    weights: str = "auto"
    device: str = "auto"
    batch_size: int = 4
    extra: dict[str, Any] = field(default_factory=dict)


def validate_request(form: dict[str, Any]) -> dict[str, Any]:
    """Checked generation parameters from a form; ValueError names the bad field."""
    params: dict[str, Any] = {}
    for key in ("tumor", "til"):
        value = str(form.get(key, "")).lower()
        if value not in LEVELS:
            raise ValueError(f"{key} must be low or high, got {value!r}")
        params[key] = value
    params["summary"] = " ".join(str(form.get("summary", "")).split())
    if len(params["summary"]) > 4000:
        raise ValueError("summary is longer than 4000 characters")
    for key, (lo, hi) in LIMITS.items():
        try:
            params[key] = int(form.get(key, ""))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{key} must be an integer, got {form.get(key)!r}") from e
        if not lo <= params[key] <= hi:
            raise ValueError(f"{key} must be in [{lo}, {hi}], got {params[key]}")
    try:
        params["scale"] = float(form.get("scale", ""))
    except (TypeError, ValueError) as e:
        raise ValueError(f"scale must be a number, got {form.get('scale')!r}") from e
    if not (math.isfinite(params["scale"]) and 0.0 <= params["scale"] <= MAX_SCALE):
        raise ValueError(f"scale must be in [0, {MAX_SCALE}], got {params['scale']}")
    return params


def plan_job(params: dict[str, Any], kind: str) -> tuple[Any, list[dict[str, Any]]]:
    """The job's condition and image records (file, seed, condition, levels), as sample.py."""
    from ldm.evaluation.sampling import image_seed

    tumor, til = params["tumor"], params["til"]
    if kind == "text":
        cond: Any = caption_from_levels(tumor, til, params["summary"])
    elif kind == "class":
        cond = class_label_from_levels(tumor, til)
    else:
        cond = None
    images = []
    for k in range(params["n"]):
        rec = {"file": f"{k:05d}.png", "prompt_index": 0, "seed": image_seed(params["seed"], k),
               "class_label" if kind == "class" else "prompt": cond, "tumor": tumor, "til": til}
        images.append(rec)
    return cond, images


class Generator:
    """A job queue with a single worker thread that owns the model."""

    def __init__(self, db: Database, spec: ModelSpec, outdir: Path, settings_id: int) -> None:
        self.db, self.spec, self.outdir = db, spec, Path(outdir)
        self.settings_id = settings_id
        self._queue: queue.Queue[str] = queue.Queue()
        self._pending: list[str] = []
        self._lock = threading.Lock()
        self._loaded: Any = None
        self._step: dict[str, tuple[int, int]] = {}  # job -> (DDIM step done, steps), in memory
        self._load_error: Exception | None = None
        self._thread = threading.Thread(target=self._work, name="generator", daemon=True)

    def start(self) -> None:
        """Requeue unfinished jobs of an earlier run and start the worker."""
        for job in self.db.unfinished_jobs():
            logger.info("requeueing generation job %s", job["id"])
            self._enqueue(job["id"])
        self._thread.start()

    def _enqueue(self, job_id: str) -> None:
        with self._lock:
            self._pending.append(job_id)
        self._queue.put(job_id)

    def submit(self, reader: str, form: dict[str, Any]) -> str:
        """Validate and queue a request; returns the job id."""
        params = validate_request(form)
        job_id = secrets.token_hex(8)
        self.db.add_job(job_id, reader, params, params["n"], self.settings_id)
        self._enqueue(job_id)
        return job_id

    def queue_position(self, job_id: str) -> int | None:
        """How many jobs run or wait before this one (None once it is not pending)."""
        with self._lock:
            return self._pending.index(job_id) if job_id in self._pending else None

    def fraction(self, job: dict[str, Any]) -> float:
        """Share of the job's work done, counting DDIM steps of the running batch."""
        if job["status"] == "done":
            return 1.0
        step, steps = self._step.get(job["id"], (0, 1))
        batch = min(self.spec.batch_size, job["total"] - job["done"])
        return min(1.0, (job["done"] + batch * step / steps) / job["total"])

    def job_dir(self, job_id: str) -> Path:
        """The output folder of a job."""
        return self.outdir / job_id

    def _work(self) -> None:
        try:  # load while the first request is being written
            self.model()
        except Exception:  # reported with every job instead
            logger.exception("loading the model failed")
        while True:
            job_id = self._queue.get()
            try:
                self._run(job_id)
            except Exception as e:  # a failed job must not stop the worker
                logger.exception("generation job %s failed", job_id)
                self.db.update_job(job_id, status="error", error=f"{type(e).__name__}: {e}")
            finally:
                with self._lock:
                    self._pending.remove(job_id)

    def model(self) -> Any:
        """The loaded model (loaded on first use, in the worker thread)."""
        if self._load_error is not None:
            raise RuntimeError(f"the model could not be loaded: {self._load_error}")
        if self._loaded is None:
            from ldm.checkpoint import load_model
            from ldm.evaluation.cli import resolve_device

            try:
                loaded = load_model(self.spec.ckpt, config=self.spec.config,
                                    weights=self.spec.weights)
                loaded.model.to(resolve_device(self.spec.device))
            except Exception as e:
                self._load_error = e
                raise
            self._loaded = loaded
        return self._loaded

    def _run(self, job_id: str) -> None:
        from ldm.evaluation.images import write_json
        from ldm.evaluation.sampling import conditioning_kind, generate_to_folder

        job = self.db.job(job_id)
        params = job["params"]
        self.db.update_job(job_id, status="running")
        loaded = self.model()
        model = loaded.model
        kind = conditioning_kind(model)
        cond, images = plan_job(params, kind)
        out = self.job_dir(job_id)
        out.mkdir(parents=True, exist_ok=True)
        meta = {"checkpoint": str(loaded.checkpoint_path.resolve()),
                "global_step": loaded.global_step, "weights": loaded.weights,
                "conditioning": kind, "conditions": [cond], "steps": params["steps"],
                "scale": params["scale"], "eta": 0.0, "seed": params["seed"], "n": params["n"],
                "sampler": "DDIM", "grid": "grid.png", "images": images,
                "request": params, "job": job_id, "reader": job["reader"]}
        write_json(meta, out / "metadata.json")
        items = [{"path": out / r["file"], "seed": r["seed"], "cond": cond} for r in images]
        bs, steps = self.spec.batch_size, params["steps"]

        def on_step(i: int) -> None:
            self._step[job_id] = (i + 1, steps)

        for start in range(0, len(items), bs):
            self._step[job_id] = (0, steps)
            generate_to_folder(model, items[start:start + bs], bs, steps, params["scale"], 0.0,
                               desc=f"job {job_id}", callback=on_step)
            self.db.update_job(job_id, done=min(start + bs, len(items)))
        self._write_grid(out, images)
        self.db.update_job(job_id, status="done", done=len(items))
        self._step.pop(job_id, None)

    @staticmethod
    def _write_grid(out: Path, images: list[dict[str, Any]]) -> None:
        import numpy as np
        from PIL import Image

        from ldm.evaluation.images import make_grid, save_png

        tiles = [np.asarray(Image.open(out / r["file"]).convert("RGB")) for r in images]
        nrow = len(tiles) if len(tiles) <= 8 else math.ceil(math.sqrt(len(tiles)))
        save_png(make_grid(tiles, nrow=nrow), out / "grid.png")

    def zip_bytes(self, job_id: str) -> bytes:
        """A zip of a finished job: its images, grid.png and metadata.json."""
        out = self.job_dir(job_id)
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(out.glob("*.png")) + [out / "metadata.json"]:
                zf.write(path, arcname=f"{job_id}/{path.name}")
        return buf.getvalue()
