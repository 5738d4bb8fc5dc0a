"""The summarizer under SIGKILL, two runs at once and awkward CSVs, against a real local server."""
from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from chat_server import ChatServer
from test_summarize_reports import REPORT_IDS, SECRET, reports_csv  # noqa: F401 (fixture)

from data_prep.summarize_reports import main

ROOT = Path(__file__).resolve().parents[1]
N_SUMMARIES = 2
MIN_CALLS = 2 * N_SUMMARIES * len(REPORT_IDS)  # key points + summary per pair


def _popen(server: ChatServer, reports: Path, out: Path, concurrency: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": SECRET}
    cmd = [sys.executable, "-m", "data_prep.summarize_reports", str(reports), "--out", str(out),
           "--base-url", server.base_url, "--n-summaries", str(N_SUMMARIES), "--concurrency",
           str(concurrency), "--backoff-base", "0.01", "--timeout", "10"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _strict_ok_pairs(out: Path) -> Counter:
    records = [json.loads(line) for line in out.read_text().splitlines()]  # strict JSONL
    return Counter((r["report_id"], r["summary_index"]) for r in records if r["status"] == "ok")


# each run loads the CLIP tokenizer (seconds): the concurrency-3 variant runs with -m slow
@pytest.mark.parametrize("concurrency", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_sigkill_repeats_at_most_the_calls_in_flight(reports_csv, tmp_path,  # noqa: F811
                                                     concurrency):
    out = tmp_path / "s.jsonl"
    kill_at = {3, 6, 9}  # SIGKILL the run as these requests arrive (global request numbers)
    current: list[subprocess.Popen] = []
    kills = 0
    with ChatServer() as server:
        server.on_request = lambda n: (os.kill(current[-1].pid, signal.SIGKILL)
                                       if n in kill_at else None)
        for _ in range(8):
            current.append(_popen(server, reports_csv, out, concurrency))
            current[-1].communicate(timeout=120)
            if current[-1].returncode == 0:
                break
            assert current[-1].returncode == -signal.SIGKILL
            kills += 1
        n_calls = len(server.requests)
    assert current[-1].returncode == 0 and kills == len(kill_at)
    assert _strict_ok_pairs(out) == Counter({(rid, i): 1 for rid in REPORT_IDS
                                             for i in range(N_SUMMARIES)})
    extra = n_calls - MIN_CALLS
    print(f"concurrency {concurrency}: {kills} kills, {n_calls} calls for {MIN_CALLS} needed "
          f"({extra} repeated)")
    assert extra <= concurrency * kills  # at most the calls in flight, as --help says
    if concurrency == 1:
        assert extra == kills  # exactly the one call in flight, each time
    help_text = subprocess.run([sys.executable, "-m", "data_prep.summarize_reports", "--help"],
                               cwd=ROOT, capture_output=True, text=True).stdout
    assert "pays again at most for the calls that were in flight" in " ".join(help_text.split())
    assert "never pays twice" not in help_text


def test_two_runs_at_once_on_one_output(reports_csv, tmp_path):  # noqa: F811
    out = tmp_path / "s.jsonl"
    with ChatServer() as server:
        server.delays = [0.2] * MIN_CALLS  # the first run is slow enough to overlap
        first = _popen(server, reports_csv, out, 2)
        lock = tmp_path / "s.jsonl.lock"
        while not lock.exists() and first.poll() is None:
            time.sleep(0.005)
        os.environ["OPENAI_API_KEY"] = SECRET
        try:  # the second run is this test's own process
            with pytest.raises(SystemExit) as err:
                main([str(reports_csv), "--out", str(out), "--base-url", server.base_url,
                      "--n-summaries", str(N_SUMMARIES)])
        finally:
            del os.environ["OPENAI_API_KEY"]
        stdout, _ = first.communicate(timeout=120)
        n_calls = len(server.requests)
    assert str(err.value).startswith(f"error: {out} is in use by another run (pid {first.pid}")
    assert first.returncode == 0 and "6 done" in stdout
    assert n_calls == MIN_CALLS  # paid once
    assert _strict_ok_pairs(out) == Counter({(rid, i): 1 for rid in REPORT_IDS
                                             for i in range(N_SUMMARIES)})


def _write(path: Path, rows: list[list[str]], encoding: str) -> Path:
    with path.open("w", newline="", encoding=encoding) as fh:
        csv.writer(fh).writerows(rows)
    return path


def test_csv_encodings_empty_ids_and_bad_out(tmp_path, caplog, capsys):
    rows = [["patient_filename", "text"], ["TCGA-AA-0001.x", "Carcinoma of the café region, "
                                           "grade 2. Margins clear."],
            ["", "A report without an id."], ["TCGA-AA-0002.y", "Benign tissue only."],
            ["  ", "Another one."]]
    out = tmp_path / "s.jsonl"
    latin = _write(tmp_path / "latin.csv", rows, "latin-1")
    with pytest.raises(SystemExit, match=r"latin.csv: not UTF-8 text .* save it as UTF-8"):
        main([str(latin), "--out", str(out), "--backend", "local"])
    bom = _write(tmp_path / "excel.csv", rows, "utf-8-sig")  # Excel's "CSV UTF-8"
    with caplog.at_level(logging.WARNING):
        assert main([str(bom), "--out", str(out), "--backend", "local"]) == 0
    assert "excel.csv: 2 row(s) without a patient_filename are left out (data rows [2, 4])" \
        in caplog.text
    assert sorted(_strict_ok_pairs(out)) == [("TCGA-AA-0001.x", 0), ("TCGA-AA-0002.y", 0)]
    with pytest.raises(SystemExit, match="--out .* is a folder"):
        main([str(bom), "--out", str(tmp_path), "--backend", "local"])
    for opt, value in (("--concurrency", "0"), ("--timeout", "nan"), ("--temperature", "-1"),
                       ("--n-summaries", "0"), ("--max-retries", "-1")):
        with pytest.raises(SystemExit) as err:
            main([str(bom), "--out", str(out), "--backend", "local", opt, value])
        assert err.value.code == 2 and value in capsys.readouterr().err
