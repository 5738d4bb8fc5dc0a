"""The web app driven in a real headless Chromium against a real server subprocess.

One generation (and a second request queued behind it), one summary review exported as a new
summaries version, and a reader study whose server is killed with SIGKILL mid-study and
restarted; the SQLite content and the exported statistics are checked. Set
``PATHLDM_APP_SCREENSHOTS=DIR`` to save the README's screenshots of the three pages there.
"""
from __future__ import annotations

import io
import json
import os
import sqlite3
import time
import zipfile
from pathlib import Path

import pytest
from app_server import AppServer, HttpReader, browser_missing, chrome, cookie_opener, make_inputs
from PIL import Image

pytestmark = pytest.mark.skipif(browser_missing() is not None, reason=str(browser_missing()))

SHOTS = os.environ.get("PATHLDM_APP_SCREENSHOTS")


def wait_for(condition, timeout: float = 90.0, what: str = "condition"):
    """Poll ``condition`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def shot(driver, name: str) -> None:
    """Save a small PNG screenshot when PATHLDM_APP_SCREENSHOTS is set."""
    if not SHOTS:
        return
    img = Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")
    img = img.quantize(colors=64)
    img.save(Path(SHOTS) / f"app_{name}.png", optimize=True)


def rows(db: Path, sql: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def by_id(driver, element_id: str):
    return driver.find_element("id", element_id)


def submit_and_wait(driver, button_id: str) -> None:
    """Click a submit button and wait until the browser has left the page."""
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    button = by_id(driver, button_id)
    button.click()
    WebDriverWait(driver, 60).until(ec.staleness_of(button))


def login(driver, server: AppServer, name: str, path: str) -> None:
    driver.get(server.url + path)
    assert "/login" in driver.current_url  # no session yet
    by_id(driver, "name").send_keys(name)
    by_id(driver, "login").click()
    wait_for(lambda: driver.current_url.endswith(path), what=f"redirect to {path}")


def generate(driver, server: AppServer) -> dict:
    """Submit one request in the browser and a second one over HTTP; check grid and zip."""
    from selenium.webdriver.support.ui import Select

    Select(by_id(driver, "slide-summary")).select_by_index(2)  # TCGA-01: slide 1 summary 0
    assert by_id(driver, "summary").get_attribute("value") == "slide 1 summary 0"
    Select(by_id(driver, "til")).select_by_value("high")
    for field, value in (("steps", "2"), ("n", "2"), ("seed", "5")):
        by_id(driver, field).clear()
        by_id(driver, field).send_keys(value)
    by_id(driver, "submit").click()
    wait_for(lambda: "/generate/jobs/" in driver.current_url, what="job page")
    job_id = driver.current_url.rsplit("/", 1)[1]
    opener = cookie_opener(driver)
    form = b"tumor=low&til=low&summary=second&scale=1&steps=1&seed=0&n=1"
    with opener.open(server.url + "/generate", data=form, timeout=30) as r:
        second = r.geturl().rsplit("/", 1)[1]
    wait_for(lambda: by_id(driver, "result").is_displayed(), what="generation result")
    assert by_id(driver, "caption").text == "high tumor; high til; slide 1 summary 0"
    assert driver.execute_script("return document.getElementById('grid').naturalWidth") == 38
    assert driver.execute_script("return document.getElementById('progress').value") == 1
    shot(driver, "generate")
    with opener.open(f"{server.url}/generate/jobs/{job_id}/images.zip", timeout=30) as r:
        zf = zipfile.ZipFile(io.BytesIO(r.read()))
    names = sorted(n.split("/")[1] for n in zf.namelist())
    assert names == ["00000.png", "00001.png", "grid.png", "metadata.json"]
    meta = json.loads(zf.read(f"{job_id}/metadata.json"))
    assert meta["weights"] == "ema" and meta["seed"] == 5 and meta["steps"] == 2
    assert meta["conditions"] == ["high tumor; high til; slide 1 summary 0"]
    assert Image.open(zf.open(f"{job_id}/00000.png")).size == (16, 16)

    def second_done():
        with opener.open(f"{server.url}/api/jobs/{second}", timeout=30) as r:
            return json.loads(r.read())["status"] == "done"
    wait_for(second_done, what="the queued second request")
    return meta


def review(driver, server: AppServer) -> None:
    """Mark the first summary 'needs correction' with a text, the second 'acceptable'."""
    driver.get(server.url + "/review")
    by_id(driver, "continue").click()
    assert by_id(driver, "summary-text").text.startswith("summary 0 of report")
    assert "point of report" in by_id(driver, "key-points").text
    shot(driver, "review")
    by_id(driver, "needs-correction").click()
    by_id(driver, "corrected").send_keys("corrected summary: grade 2 ductal carcinoma")
    by_id(driver, "comment").send_keys("grade was wrong")
    by_id(driver, "save").click()
    wait_for(lambda: driver.current_url.endswith("/review/1"), what="second review item")
    by_id(driver, "acceptable").click()
    by_id(driver, "save").click()
    wait_for(lambda: driver.find_elements("id", "all-done"), what="review list")


def answer_trials(driver, server: AppServer, truth: dict[str, str], n: int,
                  wrong_first: bool) -> list[str]:
    """Answer ``n`` trials correctly (the first one wrong if asked); returns the item ids."""
    flip = {"real": "synthetic", "synthetic": "real"}
    seen = []
    for k in range(n):
        driver.get(server.url + "/study")
        item = driver.find_element("name", "item").get_attribute("value")
        html = driver.page_source
        assert item in truth and "stratum" not in html and ".png" not in html
        choice = flip[truth[item]] if (wrong_first and k == 0) else truth[item]
        by_id(driver, f"answer-{choice}").click()
        by_id(driver, "confidence-4").click()
        submit_and_wait(driver, "submit-answer")
        seen.append(item)
    return seen


def check_study(db: Path, stats: dict, items: dict[str, str], first_item: str,
                exported: Path) -> None:
    """Stored answers and the statistics (browser export and command-line export)."""
    answers = rows(db, "SELECT a.*, s.json FROM study_answers a JOIN settings s "
                       "ON s.id = a.settings_id ORDER BY a.id")
    assert [(r["reader"], r["confidence"]) for r in answers] == (
        [("Dr A", 4)] * 3 + [("Dr B", 2)] * 6 + [("Dr A", 4)] * 3)
    assert all(r["created"].endswith("Z") and json.loads(r["json"])["study_n"] == 3
               for r in answers)
    a = stats["readers"]["Dr A"]
    assert a["accuracy"]["successes"] == 5 and a["accuracy"]["n"] == 6
    wrong = items[first_item]  # the one wrong answer was on the first item
    assert a["sensitivity"]["successes"] == (2 if wrong == "synthetic" else 3)
    assert a["specificity"]["successes"] == (2 if wrong == "real" else 3)
    b = stats["readers"]["Dr B"]
    assert (b["sensitivity"]["value"], b["specificity"]["value"]) == (1.0, 0.0)
    # Dr B is constant, so expected agreement equals observed: Cohen's kappa is 0
    assert stats["agreement"]["items"] == 6 and stats["agreement"]["cohen_kappa"] == 0.0
    assert [s["study_n"] for s in stats["settings"]] == [3]
    assert json.loads(exported.read_text()) == stats


def check_review(db: Path, summaries: Path, out: Path) -> None:
    """Stored verdicts, exported as a new summaries version."""
    from data_prep.summary_review import main as review_main

    reviews = rows(db, "SELECT * FROM summary_reviews ORDER BY id")
    assert [(r["reviewer"], r["verdict"]) for r in reviews] == [
        ("Dr A", "needs_correction"), ("Dr A", "acceptable")]
    assert review_main(["export", "--db", str(db), "--summaries", str(summaries),
                        "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 40 and {r["version"] for r in records} == {2}
    fixed = [r for r in records if r.get("review", {}).get("verdict") == "needs_correction"]
    assert len(fixed) == 1 and fixed[0]["text"] == "corrected summary: grade 2 ductal carcinoma"
    assert fixed[0]["review"]["original_text"].startswith("summary 0 of report")
    assert fixed[0]["review"]["comment"] == "grade was wrong" and fixed[0]["fits"] is True


def test_app_in_browser(tmp_path, tiny_clip_dir):
    from pathldm_app.cli import main as app_main

    inputs = make_inputs(tmp_path, tiny_clip_dir)
    db = inputs["workdir"] / "app.sqlite"
    server = AppServer(inputs).start()
    driver = chrome()
    try:
        login(driver, server, "Dr A", "/generate")
        generate(driver, server)
        review(driver, server)
        items = {r["item"]: r["source"] for r in rows(db, "SELECT * FROM study_items")}
        assert sorted(items.values()) == ["real"] * 3 + ["synthetic"] * 3
        driver.get(server.url + "/study")
        shot(driver, "study")
        # a second reader with her own session answers "synthetic" throughout, in between
        other = HttpReader(server.url, "Dr B")
        order = sorted(items)
        first = answer_trials(driver, server, items, 3, wrong_first=True)
        for item in order[:3]:
            other.post("/study/answer", {"item": item, "answer": "synthetic", "confidence": 2})
        assert len(rows(db, "SELECT * FROM study_answers")) == 6
        server.kill()  # SIGKILL mid-study
        server.start()  # same settings and port: the session cookies are still valid
        driver.get(server.url + "/study")
        assert by_id(driver, "trial").text == "4 / 6"
        for item in order[3:]:
            other.post("/study/answer", {"item": item, "answer": "synthetic", "confidence": 2})
        rest = answer_trials(driver, server, items, 3, wrong_first=False)
        assert sorted(first + rest) == order
        assert "all 6 images" in by_id(driver, "finished").text
        with cookie_opener(driver).open(server.url + "/study/stats.json", timeout=30) as r:
            stats = json.loads(r.read())
    finally:
        driver.quit()
        server.stop()
    exported = tmp_path / "stats.json"
    assert app_main(["--workdir", str(inputs["workdir"]), "--export-study", str(exported)]) == 0
    check_study(db, stats, items, first[0], exported)
    check_review(db, inputs["summaries"], tmp_path / "summaries_v2.jsonl")


@pytest.mark.slow
def test_three_readers_in_parallel_stratified(tmp_path, tiny_clip_dir):
    """Three browsers answer in turn; sessions stay apart; Fleiss' kappa of their answers."""
    inputs = make_inputs(tmp_path, tiny_clip_dir)
    db = inputs["workdir"] / "app.sqlite"
    server = AppServer(inputs, study_n=2, extra=["--stratify"]).start()
    drivers = {name: chrome(800, 600) for name in ("Dr A", "Dr B", "Dr C")}
    try:
        for name, driver in drivers.items():
            login(driver, server, name, "/study")
        items = {r["item"]: r for r in rows(db, "SELECT * FROM study_items")}
        assert {r["stratum"] for r in items.values()} == {"high tumor / low til"}
        assert sorted(r["source"] for r in items.values()) == ["real"] * 2 + ["synthetic"] * 2
        seen: dict[str, list[str]] = {name: [] for name in drivers}
        for k in range(len(items)):
            for i, (name, driver) in enumerate(drivers.items()):
                driver.get(server.url + "/study")
                assert by_id(driver, "trial").text == f"{k + 1} / {len(items)}"
                item = driver.find_element("name", "item").get_attribute("value")
                seen[name].append(item)
                # A always right, B always "real", C right except on its first image
                truth = items[item]["source"]
                choice = {0: truth, 1: "real"}.get(i, truth if k else
                                                   {"real": "synthetic"}.get(truth, "real"))
                by_id(driver, f"answer-{choice}").click()
                by_id(driver, f"confidence-{i + 1}").click()
                submit_and_wait(driver, "submit-answer")
        assert all(sorted(v) == sorted(items) for v in seen.values())
        assert len({tuple(v) for v in seen.values()}) > 1  # each reader has an own order
        with cookie_opener(drivers["Dr C"]).open(server.url + "/study/stats.json") as r:
            stats = json.loads(r.read())
    finally:
        for driver in drivers.values():
            driver.quit()
        server.stop()
    answers = rows(db, "SELECT reader, item, answer, confidence FROM study_answers")
    assert len(answers) == 12
    assert {(r["reader"], r["confidence"]) for r in answers} == {("Dr A", 1), ("Dr B", 2),
                                                                  ("Dr C", 3)}
    assert stats["readers"]["Dr A"]["accuracy"]["value"] == 1.0
    assert stats["readers"]["Dr B"]["specificity"]["value"] == 1.0
    assert stats["readers"]["Dr B"]["sensitivity"]["value"] == 0.0
    assert stats["readers"]["Dr C"]["accuracy"]["successes"] == 3
    # Fleiss' kappa by hand from the stored answers
    by_item: dict[str, list[str]] = {}
    for r in answers:
        by_item.setdefault(r["item"], []).append(r["answer"])
    n_real = [a.count("real") for a in by_item.values()]
    p_i = [(x * x + (3 - x) ** 2 - 3) / 6 for x in n_real]
    p_real = sum(n_real) / 12
    pe = p_real ** 2 + (1 - p_real) ** 2
    expected = (sum(p_i) / 4 - pe) / (1 - pe)
    assert stats["agreement"]["fleiss_kappa"] == pytest.approx(expected)
    assert set(stats["strata"]) == {"high tumor / low til"}
