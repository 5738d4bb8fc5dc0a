"""Report summarization against a real OpenAI-compatible HTTP server on 127.0.0.1."""
from __future__ import annotations

import csv
import json
import logging
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import openai
import pytest
from chat_server import ChatServer, is_summary_request, report_text_of

from data_prep.llm import RetryPolicy, call_with_retries, retry_after_seconds
from data_prep.summarize_reports import main
from data_prep.summary_backends import LOCAL_MODEL, TokenBudget, extractive_summary

try:  # the HTTP package under the openai client (httpx2 in newer releases)
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx

SECRET = "sk-test-DO-NOT-LEAK-0123456789"
REPORT_IDS = [f"TCGA-A{i}-000{i}.uuid-{i}" for i in range(3)]


@pytest.fixture
def reports_csv(tmp_path: Path) -> Path:
    path = tmp_path / "reports.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_filename", "text"])
        for i, rid in enumerate(REPORT_IDS):
            w.writerow([rid, f"Report {rid}. Invasive ductal carcinoma, grade {i + 1}. "
                             f"Tumor size {i + 2}.0 cm. Margins negative."])
    return path


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    with ChatServer() as s:
        yield s


def _run(server: ChatServer, reports: Path, out: Path, *extra: str) -> int:
    return main([str(reports), "--out", str(out), "--base-url", server.base_url,
                 "--backoff-base", "0.01", "--backoff-max", "1", "--concurrency", "2",
                 "--timeout", "10", *extra])


def _records(out: Path, skip: tuple[int, ...] = ()) -> list[dict]:
    """Every line parsed as JSON (strict), except the line numbers in ``skip``."""
    lines = out.read_text().splitlines()
    return [json.loads(line) for n, line in enumerate(lines) if line.strip() and n not in skip]


def _ok_pairs(out: Path, skip: tuple[int, ...] = ()) -> Counter:
    return Counter((r["report_id"], r["summary_index"]) for r in _records(out, skip)
                   if r["status"] == "ok")


def test_two_step_conversation_and_records(server, reports_csv, tmp_path, caplog, capsys):
    out = tmp_path / "s.jsonl"
    with caplog.at_level(logging.DEBUG):
        assert _run(server, reports_csv, out, "--n-summaries", "2", "--log-level", "DEBUG") == 0
    reqs = server.requests
    assert len(reqs) == 12 and all(r["path"] == "/v1/chat/completions" for r in reqs)
    assert all(r["headers"]["authorization"] == f"Bearer {SECRET}" for r in reqs)
    first = [r["body"] for r in reqs if not is_summary_request(r["body"])]
    second = [r["body"] for r in reqs if is_summary_request(r["body"])]
    assert len(first) == len(second) == 6
    for body in first:
        assert body["model"] == "gpt-3.5-turbo" and "max_tokens" not in body
        assert [m["role"] for m in body["messages"]] == ["system", "user"]
        assert "key points" in body["messages"][1]["content"]
    for body in second:
        roles = [m["role"] for m in body["messages"]]
        assert roles == ["system", "user", "assistant", "user"] and body["max_tokens"] == 154
        assert body["messages"][2]["content"].startswith("- invasive ductal carcinoma")
        assert "75 words" in body["messages"][3]["content"]
        assert report_text_of(body).startswith("Report TCGA-")
    recs = [r for r in _records(out) if r["status"] == "ok"]
    assert _ok_pairs(out) == Counter({(rid, i): 1 for rid in REPORT_IDS for i in range(2)})
    r = recs[0]
    assert r["model"] == "gpt-3.5-turbo" and r["prompt_version"] == "v1" and r["fits"]
    assert r["usage"] == {"prompt_tokens": 280, "completion_tokens": 50, "total_tokens": 330}
    assert r["text"].startswith("Invasive ductal carcinoma, grade 2")
    assert r["clip_tokens"] == TokenBudget().count(r["text"])
    printed = capsys.readouterr()
    assert "tokens (prompt / completion): 1680 / 300" in printed.out
    assert "estimated cost (USD): 0.0013" in printed.out  # 1680 * 0.5e-6 + 300 * 1.5e-6
    everything = out.read_text() + caplog.text + printed.out + printed.err
    assert SECRET not in everything


def test_429_and_500_are_retried_honouring_retry_after(server, reports_csv, tmp_path, capsys):
    server.plan = [(429, {"Retry-After": "0.4"}), (500, {}), (503, {})]
    out = tmp_path / "s.jsonl"
    assert _run(server, reports_csv, out, "--concurrency", "1") == 0
    times = [r["time"] for r in server.requests]
    assert times[1] - times[0] >= 0.4  # waited as the 429 asked
    assert len(server.requests) == 6 + 3  # three failures, each retried once, no other calls
    assert _ok_pairs(out) == Counter({(rid, 0): 1 for rid in REPORT_IDS})
    assert "API calls ok (retried): 6 (3)" in capsys.readouterr().out


def test_timeout_is_retried(server, reports_csv, tmp_path, capsys):
    server.delays = [1.5]  # the first request outlives the 0.5 s client timeout
    out = tmp_path / "s.jsonl"
    assert _run(server, reports_csv, out, "--concurrency", "1", "--timeout", "0.5") == 0
    assert len(server.requests) == 6 + 1
    assert _ok_pairs(out) == Counter({(rid, 0): 1 for rid in REPORT_IDS})
    assert "API calls ok (retried): 6 (1)" in capsys.readouterr().out


def test_backoff_grows_exponentially():
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    calls, delays = [], []

    def flaky():
        calls.append(1)
        if len(calls) <= 4:
            raise openai.InternalServerError("down", response=httpx.Response(
                503, request=request), body=None)
        return "ok"

    policy = RetryPolicy(max_retries=5, base_delay=1.0, max_delay=5.0)
    assert call_with_retries(flaky, policy, "t", sleep=delays.append) == "ok"
    bounds = [(0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (2.5, 5.0)]  # jitter in [0.5, 1], cap 5
    assert len(delays) == 4 and all(lo <= d <= hi for d, (lo, hi) in zip(delays, bounds))
    calls.clear()
    with pytest.raises(openai.InternalServerError):
        call_with_retries(flaky, RetryPolicy(max_retries=2, base_delay=0.0), "t",
                          sleep=delays.append)
    assert len(calls) == 3


def test_exhausted_retries_and_bad_request_fail_without_record(server, reports_csv, tmp_path):
    server.plan = [(400, {})] + [(500, {})] * 3
    out = tmp_path / "s.jsonl"
    assert _run(server, reports_csv, out, "--concurrency", "1", "--max-retries", "2") == 1
    assert len(server.requests) == 1 + 3 + 2  # 400 not retried; 500 x3 exhausts 2 retries
    assert sum(_ok_pairs(out).values()) == 1  # the third report went through
    assert _run(server, reports_csv, out) == 0  # a rerun does the two failed pairs only
    assert _ok_pairs(out) == Counter({(rid, 0): 1 for rid in REPORT_IDS})


def _ctrl_c_at(request_number: int):
    """A server hook that sends SIGINT to the main thread on one request, then holds that
    response a moment so the run is still in flight when the signal is handled (a real signal
    wakes the blocked main thread; ``_thread.interrupt_main`` only sets a flag, and on a loaded
    machine the run could finish before the flag was ever checked)."""
    def hook(n: int) -> None:
        if n == request_number:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            time.sleep(0.5)
    return hook


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler (KeyboardInterrupt) for the test, as in a fresh process: a
    library used by an earlier test in the same process may have left another one installed."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("how", ["interrupt", "outage"])
def test_killed_run_resumes_each_pair_exactly_once(server, reports_csv, tmp_path, how,
                                                   python_sigint):
    out = tmp_path / "s.jsonl"
    if how == "interrupt":  # Ctrl-C in the main thread while requests are in flight
        server.on_request = _ctrl_c_at(5)
        assert _run(server, reports_csv, out, "--n-summaries", "3") == 130
    else:  # the server goes down for good after 7 requests
        server.fail_after = 7
        assert _run(server, reports_csv, out, "--n-summaries", "3", "--max-retries", "1") == 1
    first = _ok_pairs(out)
    assert 0 < sum(first.values()) < 9 and max(first.values()) == 1
    noted = {(r["report_id"], r["summary_index"]) for r in _records(out)
             if r["status"] == "key_points"} - set(first)  # unfinished, key points recorded
    server.on_request, server.fail_after = None, None
    n_before = len(server.requests)
    assert _run(server, reports_csv, out, "--n-summaries", "3") == 0
    assert _ok_pairs(out) == Counter({(rid, i): 1 for rid in REPORT_IDS for i in range(3)})
    # the rerun asked only for the pairs that were missing, and for the key points only where
    # none were recorded
    asked = Counter(report_text_of(r["body"]).split()[1].rstrip(".")
                    for r in server.requests[n_before:] if not is_summary_request(r["body"]))
    summarized = Counter(report_text_of(r["body"]).split()[1].rstrip(".")
                         for r in server.requests[n_before:] if is_summary_request(r["body"]))
    done_first = Counter(rid for rid, _ in first)
    noted_per = Counter(rid for rid, _ in noted)
    assert summarized == Counter({rid: 3 - done_first[rid] for rid in REPORT_IDS
                                  if done_first[rid] < 3})
    assert asked == Counter({rid: 3 - done_first[rid] - noted_per[rid] for rid in REPORT_IDS
                             if 3 - done_first[rid] - noted_per[rid] > 0})


def test_misfit_is_regenerated_then_flagged(server, reports_csv, tmp_path, capsys):
    long_text = " ".join(["carcinoma"] * 200)
    calls = Counter()

    def summary(body):
        rid = report_text_of(body).split()[1].rstrip(".")
        calls[rid] += 1
        if rid == REPORT_IDS[0] or (rid == REPORT_IDS[1] and calls[rid] == 1):
            return long_text
        return "Short summary."

    server.summary_text = summary
    out = tmp_path / "s.jsonl"
    assert _run(server, reports_csv, out, "--fit-retries", "2") == 0
    recs = {r["report_id"]: r for r in _records(out)}
    assert calls == Counter({REPORT_IDS[0]: 3, REPORT_IDS[1]: 2, REPORT_IDS[2]: 1})
    assert not recs[REPORT_IDS[0]]["fits"] and recs[REPORT_IDS[0]]["clip_tokens"] > 154
    assert recs[REPORT_IDS[1]]["fits"] and recs[REPORT_IDS[1]]["attempts"] == 2
    assert "flagged misfits: 1" in capsys.readouterr().out


def test_fatal_auth_error_stops_the_run(server, reports_csv, tmp_path, capsys):
    server.plan = [(401, {})]
    out = tmp_path / "s.jsonl"
    assert _run(server, reports_csv, out, "--concurrency", "1") == 1
    assert len(server.requests) == 1
    text = capsys.readouterr().out
    assert "fatal API error, run stopped: HTTP 401" in text and "not attempted" in text


def test_empty_and_unreadable_reports_are_recorded(tmp_path, capsys):
    folder = tmp_path / "reports"
    folder.mkdir()
    (folder / "good.txt").write_text("Invasive lobular carcinoma, grade 2. Margins are clear.")
    (folder / "empty.txt").write_text("   \n")
    (folder / "binary.txt").write_bytes(b"\xff\xfe\x00garbage\x81")
    out = tmp_path / "s.jsonl"
    for _ in range(2):  # a rerun does not repeat the error records
        assert main([str(folder), "--out", str(out), "--backend", "local"]) == 1
    recs = _records(out)
    errors = {r["report_id"]: r["reason"] for r in recs if r["status"] == "error"}
    assert errors == {"empty": "empty report",
                      "binary": errors["binary"]} and "not UTF-8" in errors["binary"]
    assert [r["report_id"] for r in recs if r["status"] == "ok"] == ["good"]
    assert "empty: empty report" in capsys.readouterr().out


def test_local_standin_and_auto_fallback(monkeypatch, reports_csv, tmp_path, caplog):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    out = tmp_path / "s.jsonl"
    with caplog.at_level(logging.WARNING):
        assert main([str(reports_csv), "--out", str(out), "--backend", "auto"]) == 0
    assert "LOCAL EXTRACTIVE STAND-IN" in caplog.text
    recs = _records(out)
    assert len(recs) == 3 and all(r["model"] == LOCAL_MODEL and r["fits"] for r in recs)
    assert recs[0]["text"].startswith("Invasive ductal carcinoma")  # keyword sentences first
    with pytest.raises(SystemExit, match="OPENAI_API_KEY"):
        main([str(reports_csv), "--out", str(out)])


def test_extractive_summary_respects_budget():
    budget = TokenBudget()
    report = " ".join(f"Invasive carcinoma finding number {i} with margin details."
                      for i in range(60))
    text = extractive_summary(report, budget)
    assert budget.fits(text) and len(text.split()) <= 75 and text.startswith("Invasive")
    one_long = "carcinoma " * 300
    assert budget.fits(extractive_summary(one_long, budget))
    assert budget.prefix == "high tumor; high til; "


def test_torn_last_line_is_skipped_and_resumed(server, reports_csv, tmp_path):
    out = tmp_path / "s.jsonl"
    good = {"report_id": REPORT_IDS[0], "summary_index": 0, "status": "ok", "text": "x",
            "model": "gpt-3.5-turbo", "prompt_version": "v1"}
    out.write_text(json.dumps(good) + "\n" + '{"report_id": "TCGA-A1-00')
    assert _run(server, reports_csv, out) == 0
    assert '{"report_id": "TCGA-A1-00\n' not in out.read_text()  # cut off, not left inside
    assert _ok_pairs(out) == Counter({(rid, 0): 1 for rid in REPORT_IDS})  # strict JSONL
    assert len(server.requests) == 4  # only the two missing reports


def test_retry_after_parsing():
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert retry_after_seconds({}) is None
