"""The web app's statistics (closed-form values), study plan, storage, review export and access
control (a real uvicorn server on 127.0.0.1 in a thread, no browser)."""
from __future__ import annotations

import io
import json
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image
from tcga_store import random_store, write_store

pytest.importorskip("fastapi", reason="needs the app extra: pip install -e '.[app]'")

from pathldm_app.stats import (  # noqa: E402
    binary_metrics,
    cohen_kappa,
    fleiss_kappa,
    study_statistics,
    wilson_interval,
)

# Fleiss (1971) as tabulated on Wikipedia: 10 subjects, 14 raters, 5 categories; kappa 0.210.
FLEISS_TABLE = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0],
                [2, 2, 8, 1, 1], [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2],
                [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]


def test_wilson_interval_closed_form():
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and round(hi, 4) == 0.2775
    # symmetric around 1/2 for k and n - k
    a, b = wilson_interval(3, 7), wilson_interval(4, 7)
    assert a[0] == pytest.approx(1 - b[1]) and a[1] == pytest.approx(1 - b[0])
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_kappas_closed_form():
    # 50 items: both yes 20, A yes/B no 5, A no/B yes 10, both no 15 -> po .7, pe .5, kappa .4
    a = ["y"] * 25 + ["n"] * 25
    b = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)
    assert cohen_kappa(a, a) == 1.0 and cohen_kappa(["y"] * 3, ["y"] * 3) is None
    assert fleiss_kappa(FLEISS_TABLE) == pytest.approx(0.20993, abs=5e-5)
    with pytest.raises(ValueError, match="same number"):
        fleiss_kappa([[1, 1], [2, 1]])


def test_binary_metrics_and_study_statistics():
    truth = ["synthetic"] * 3 + ["real"] * 2
    answers = ["synthetic", "real", "synthetic", "real", "synthetic"]
    m = binary_metrics(truth, answers)
    assert (m["accuracy"]["successes"], m["accuracy"]["n"]) == (3, 5)
    assert m["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert m["specificity"]["value"] == 0.5
    assert m["confusion"] == {"true_synthetic": 2, "false_real": 1, "true_real": 1,
                              "false_synthetic": 1}
    with pytest.raises(ValueError, match="labels"):
        binary_metrics(["real"], ["fake"])
    # three readers: Fleiss' kappa of the items table, pairwise Cohen's kappas
    rows = []
    answers_of = {"A": "ssrrs", "B": "srrrs", "C": "ssrsr"}
    for reader, ans in answers_of.items():
        for i, a in enumerate(ans):
            rows.append({"reader": reader, "item": f"i{i}", "truth": "synthetic" if i < 3
                         else "real", "answer": "synthetic" if a == "s" else "real",
                         "confidence": 3, "stratum": "all"})
    stats = study_statistics(rows)
    table = [[sum(answers_of[r][i] == c for r in "ABC") for c in "rs"] for i in range(5)]
    assert stats["agreement"]["fleiss_kappa"] == pytest.approx(fleiss_kappa(table))
    # item-wise agreement: P_i = 1, 1/3, 1, 1/3, 1/3 -> P = 0.6; p_r = 7/15, p_s = 8/15
    pe = (7 / 15) ** 2 + (8 / 15) ** 2
    assert stats["agreement"]["fleiss_kappa"] == pytest.approx((0.6 - pe) / (1 - pe))
    assert set(stats["agreement"]["pairwise_cohen_kappa"]) == {"A / B", "A / C", "B / C"}
    assert stats["readers"]["A"]["mean_confidence"] == 3 and stats["answers"] == 15


def _generated(folder, n, levels=("high", "low"), size=16):
    folder.mkdir()
    rng = np.random.default_rng(0)
    recs = []
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(
            folder / f"{k:05d}.png")
        recs.append({"file": f"{k:05d}.png", "tumor": levels[k % 2], "til": "low"})
    (folder / "metadata.json").write_text(json.dumps({"images": recs}))
    return folder


def test_study_plan_balanced_seeded_stratified(tmp_path):
    from pathldm_app.study import ImageSource, StudyConfig, build_plan, reader_order

    store = random_store(tmp_path / "s.h5", n=16, tile=24)
    gen = _generated(tmp_path / "gen", 10)
    cfg = StudyConfig(store, gen, n=4, seed=3)
    plan = build_plan(cfg)
    assert [p["source"] for p in plan].count("real") == 4 == len(plan) - 4
    again = build_plan(cfg)
    assert [(p["source"], p["ref"]) for p in plan] == [(p["source"], p["ref"]) for p in again]
    assert {p["item"] for p in plan}.isdisjoint({p["item"] for p in again})  # fresh opaque ids
    other = build_plan(StudyConfig(store, gen, n=4, seed=4))
    assert [(p["source"], p["ref"]) for p in other] != [(p["source"], p["ref"]) for p in plan]
    assert len({p["item"] for p in plan}) == 8 and all(len(p["item"]) == 16 for p in plan)
    # stratified: as many real as synthetic in every tumor/TIL stratum
    tumor = [0.9, 0.1] * 8
    s2 = write_store(tmp_path / "s2.h5", [np.zeros((24, 24, 3), np.uint8)] * 16, [0] * 16,
                     tumor, [0.2] * 16, ["S"], [["x"]])
    strat = build_plan(StudyConfig(s2, gen, n=3, seed=0, stratify=True))
    for stratum in ("high tumor / low til", "low tumor / low til"):
        sources = [p["source"] for p in strat if p["stratum"] == stratum]
        assert sources.count("real") == sources.count("synthetic") == 3
    (gen / "metadata.json").write_text("{}")
    with pytest.raises(ValueError, match="no tumor/TIL levels for 00000.png"):
        build_plan(StudyConfig(s2, gen, n=3, stratify=True))
    order = reader_order(8, 0, "Dr A")
    assert sorted(order) == list(range(8)) and order == reader_order(8, 0, "Dr A")
    assert order != reader_order(8, 0, "Dr B")
    # real (24 px JPEG) and synthetic (16 px PNG) images are served alike
    src = ImageSource(cfg)
    pngs = [Image.open(io.BytesIO(src.png(p))) for p in plan]
    assert {(im.format, im.size, im.mode) for im in pngs} == {("PNG", (16, 16), "RGB")}
    assert all(not im.info for im in pngs)


def test_storage_wal_first_answer_wins_and_plan_guard(tmp_path):
    from pathldm_app.storage import Database

    db = Database(tmp_path / "a.sqlite")
    conn = sqlite3.connect(tmp_path / "a.sqlite")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    sid = db.settings_id({"x": 1})
    assert db.settings_id({"x": 1}) == sid != db.settings_id({"x": 2})
    items = [{"item": "abc", "position": 0, "source": "real", "ref": "3", "stratum": "all"}]
    db.init_study("key-1", items)
    db.init_study("key-1", [])  # same settings: kept
    with pytest.raises(ValueError, match="other settings"):
        db.init_study("key-2", items)
    assert db.store_answer("A", "abc", "real", 3, sid) is True
    assert db.store_answer("A", "abc", "synthetic", 5, sid) is False
    assert db.store_answer("B", "abc", "synthetic", 5, sid) is True
    assert [(r["reader"], r["answer"], r["truth"]) for r in db.answers()] == [
        ("A", "real", "real"), ("B", "synthetic", "real")]
    token = db.new_session("A")
    assert db.session_reader(token) == "A" and db.session_reader("nope") is None


def test_review_sample_and_export(tmp_path):
    from data_prep.summary_review import apply_reviews, export, review_sample

    ids = [f"R{i:02d}" for i in range(40)]
    sample = review_sample(ids, 0.05, seed=1)
    assert len(sample) == 2 and sample == review_sample(reversed(ids), 0.05, seed=1)
    assert review_sample(ids[:3], 0.05) and review_sample([], 0.05) == []
    with pytest.raises(ValueError, match="fraction"):
        review_sample(ids, 0.0)
    records = {("R1", 0): {"report_id": "R1", "summary_index": 0, "text": "a", "version": 2},
               ("R2", 0): {"report_id": "R2", "summary_index": 0, "text": "b", "version": 2}}
    reviews = [{"report_id": "R1", "summary_index": 0, "verdict": "needs_correction",
                "corrected_text": "first fix", "reviewer": "A", "created": "t1"},
               {"report_id": "R1", "summary_index": 0, "verdict": "needs_correction",
                "corrected_text": "second fix", "reviewer": "B", "created": "t2"}]
    out, counts = apply_reviews(records, reviews, count_tokens=len, max_tokens=5)
    assert [r["version"] for r in out] == [3, 3] and out[0]["text"] == "second fix"
    assert out[0]["clip_tokens"] == 10 and out[0]["fits"] is False
    assert out[0]["review"]["reviewer"] == "B" and "review" not in out[1]
    assert counts == {"records": 2, "reviewed": 1, "corrected": 1,
                      "needs_correction_without_text": 0}
    summaries = tmp_path / "s.jsonl"
    summaries.write_text("")
    with pytest.raises(ValueError, match="overwrite"):
        export(tmp_path / "db.sqlite", summaries, summaries)
    with pytest.raises(FileNotFoundError, match="review database"):
        export(tmp_path / "db.sqlite", summaries, tmp_path / "o.jsonl")


def test_cli_refuses_public_host_without_token(tmp_path, caplog):
    from pathldm_app.cli import is_loopback, main

    assert main(["--host", "0.0.0.0", "--workdir", str(tmp_path)]) == 2
    assert "without an access token" in caplog.text
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("192.168.1.5") and not is_loopback("example.org")
    from scripts_loader import load_script

    from pathldm_app.cli import build_parser, build_state

    with pytest.raises(SystemExit) as e:  # scripts/app.py is the same command
        load_script("app").main(["--help"])
    assert e.value.code == 0
    with pytest.raises(ValueError, match="needs --store"):
        build_state(build_parser().parse_args(["--generated", str(tmp_path), "--workdir",
                                               str(tmp_path / "w")]))


def _serve(app, port):
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    return server, thread


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def test_token_login_and_sessions_over_http(tmp_path):
    """Access token, cookie sessions and login redirects, served by a real uvicorn."""
    from app_server import free_port

    from pathldm_app.cli import build_parser, build_state
    from pathldm_app.web import create_app

    store = random_store(tmp_path / "s.h5", n=8, tile=24)
    gen = _generated(tmp_path / "gen", 4)
    port = free_port()
    args = build_parser().parse_args(["--store", str(store), "--generated", str(gen),
                                      "--study-n", "2", "--token", "s3cret", "--workdir",
                                      str(tmp_path / "app")])
    server, thread = _serve(create_app(build_state(args)), port)
    base = f"http://127.0.0.1:{port}"
    opener = urllib.request.build_opener(_NoRedirect)

    def call(path, data=None, cookie=None):
        req = urllib.request.Request(base + path, data=urllib.parse.urlencode(data).encode()
                                     if data is not None else None)
        if cookie:
            req.add_header("Cookie", cookie)
        try:
            with opener.open(req, timeout=10) as r:
                return r.status, dict(r.headers), r.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()

    try:
        status, headers, _ = call("/study")
        assert status == 303 and headers["location"] == "/login?next=/study"
        assert call("/api/jobs/x")[0] == 401
        status, _, body = call("/login", {"name": "Dr A", "token": "wrong", "next": "/study"})
        assert status == 400 and b"wrong access token" in body
        status, headers, _ = call("/login", {"name": "Dr A", "token": "s3cret", "next": "/study"})
        assert status == 303 and headers["location"] == "/study"
        cookie = headers["set-cookie"].split(";")[0]
        status, _, page = call("/study", cookie=cookie)
        assert status == 200 and b"1 / 4" in page
        item = page.split(b'name="item" value="')[1].split(b'"')[0].decode()
        status, headers, png = call(f"/study/image/{item}", cookie=cookie)
        assert status == 200 and headers["content-type"] == "image/png"
        assert "content-disposition" not in {k.lower() for k in headers}
        assert call("/study/stats.json", cookie=cookie)[0] == 403  # key hidden until done
        assert call("/study/answer", {"item": item, "answer": "maybe", "confidence": 3},
                    cookie=cookie)[0] == 400
        assert call("/login", {"name": "Dr A", "token": "", "next": "//evil.org"})[0] == 400
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_generation_request_checks_and_progress(tmp_path):
    from pathldm_app.generate import Generator, ModelSpec, plan_job, validate_request
    from pathldm_app.storage import Database

    form = {"tumor": "HIGH", "til": "low", "summary": "  a  b ", "scale": "1.75",
            "steps": "50", "seed": "7", "n": "3"}
    params = validate_request(form)
    assert params == {"tumor": "high", "til": "low", "summary": "a b", "scale": 1.75,
                      "steps": 50, "seed": 7, "n": 3}
    for key, value, message in (("tumor", "mid", "tumor must be low or high"),
                                ("steps", "0", r"steps must be in \[1, 1000\]"),
                                ("n", "x", "n must be an integer"),
                                ("scale", "nan", "scale must be in")):
        with pytest.raises(ValueError, match=message):
            validate_request({**form, key: value})
    cond, images = plan_job(params, "text")
    assert cond == "high tumor; low til; a b"
    assert [r["file"] for r in images] == ["00000.png", "00001.png", "00002.png"]
    assert plan_job(params, "class")[0] == 2 and len({r["seed"] for r in images}) == 3
    gen = Generator(Database(tmp_path / "a.sqlite"), ModelSpec("none", batch_size=2),
                    tmp_path / "out", settings_id=1)
    job = {"id": "j", "status": "running", "done": 2, "total": 3}
    gen._step["j"] = (25, 50)  # half-way through the last batch (one image)
    assert gen.fraction(job) == pytest.approx(2.5 / 3)
    assert gen.fraction({**job, "status": "done"}) == 1.0


def test_unfinished_jobs_are_requeued_and_load_errors_reported(tmp_path):
    """A job left 'running' by a killed server runs again; a missing model fails it clearly."""
    from pathldm_app.generate import Generator, ModelSpec
    from pathldm_app.storage import Database

    db = Database(tmp_path / "a.sqlite")
    params = {"tumor": "low", "til": "low", "summary": "", "scale": 1.0, "steps": 2, "seed": 0,
              "n": 1}
    db.add_job("old", "Dr A", params, 1, db.settings_id({}))
    db.update_job("old", status="running")
    gen = Generator(db, ModelSpec(str(tmp_path / "missing.ckpt")), tmp_path / "out", 1)
    gen.start()
    deadline = time.monotonic() + 30
    while gen.queue_position("old") is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    job = db.job("old")
    assert job["status"] == "error" and "missing.ckpt" in job["error"]
    assert "could not be loaded" in job["error"]


@pytest.mark.parametrize("option,value", [
    ("--port", "70000"), ("--batch-size", "0"), ("--study-n", "-1"),
    ("--review-fraction", "0"), ("--review-fraction", "nan"), ("--study-seed", "-3"),
])
def test_cli_numeric_options_are_checked(option, value):
    """Bad numbers stop at parse time with the option and the value named."""
    from pathldm_app.cli import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([option, value])
    assert exit_info.value.code == 2
