"""Summarize pathology reports with an LLM (PathLDM's two-step chain of thought) into JSONL.

For every report and summary index the model is first asked for the report's key points, then,
in the same conversation, for a 75-word summary with ``max_tokens=154``. Each summary is
checked to fit the 154-token CLIP budget together with the ``high tumor; high til; `` caption
prefix; a misfit is regenerated up to ``--fit-retries`` times and flagged if it still does not
fit. Output is append-only JSONL, one record per (report, summary index); every API answer is
recorded as it arrives (the key points and each regenerated misfit too), and a rerun skips
pairs that are done and goes on from a pair's recorded steps. So a run killed in any way, even
by SIGKILL, pays again at most for the calls that were in flight: at most ``--concurrency``
calls per kill. A torn last line left by a kill is cut off on the next run. The output is locked
while a run writes it: a second run on the same ``--out`` stops with the holder's pid. Empty or
unreadable reports get an error record with the reason. The API key is read from the environment
(``OPENAI_API_KEY`` by default) and never logged or written.

Inputs: the TCGA reports corpus CSV (columns ``patient_filename,text``; configurable) or a
folder of ``.txt`` files (report id = file name without ``.txt``).

``--backend local`` (or ``auto`` without a key) uses a local *extractive stand-in*, not an LLM:
it keeps the report sentences with the most diagnostic keywords, within the token budget, and
labels its records ``model: "local-extractive-standin"``.

Example::

    OPENAI_API_KEY=... python -m data_prep.summarize_reports TCGA_Reports.csv \\
        --out summaries.jsonl --n-summaries 5 --concurrency 8
    python -m data_prep.summarize_reports reports/ --out s.jsonl \\
        --base-url http://localhost:8000/v1 --model meta-llama/Llama-3.1-8B-Instruct
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_prep.common import (
    JsonlLog,
    OutputLocked,
    RunSummary,
    add_logging_arg,
    output_lock,
    read_csv_table,
    setup_logging,
)
from data_prep.llm import FatalAPIError, RetryPolicy, Usage, scrub
from data_prep.summary_backends import (
    LOCAL_MODEL,
    LocalExtractiveBackend,
    OpenAIBackend,
    Prompts,
    TokenBudget,
    estimate_cost,
    load_price_table,
)
from ldm.argtypes import (
    float_in,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Report:
    """One report; ``error`` is set when it cannot be summarized (empty, unreadable)."""

    report_id: str
    text: str
    error: str | None = None


def load_reports(path: Path, id_column: str = "patient_filename",
                 text_column: str = "text") -> list[Report]:
    """Reports from a CSV (id + text columns) or a folder of ``.txt`` files, sorted by id."""
    if path.is_dir():
        reports = [_read_txt(p) for p in sorted(path.glob("*.txt"))]
    else:
        reports = _read_csv(path, id_column, text_column)
    dups = sorted(i for i, n in Counter(r.report_id for r in reports).items() if n > 1)
    if dups:
        raise ValueError(f"{path}: duplicate report ids: {dups[:10]}")
    return sorted(reports, key=lambda r: r.report_id)


def _read_txt(p: Path) -> Report:
    rid = p.name[: -len(".txt")]
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        return Report(rid, "", f"unreadable: {p.name} is not UTF-8 text ({e.reason} at byte "
                               f"{e.start})")
    except OSError as e:
        return Report(rid, "", f"unreadable: {e}")
    return _checked(rid, text)


def _read_csv(path: Path, id_column: str, text_column: str) -> list[Report]:
    rows = read_csv_table(path, (id_column, text_column), "set --id-column/--text-column")
    out, no_id = [], []
    for n, row in enumerate(rows, 1):
        rid = row[id_column].strip()
        if rid:
            out.append(_checked(rid, row[text_column]))
        else:
            no_id.append(n)
    if no_id:
        logger.warning("%s: %d row(s) without a %s are left out (data rows %s)", path,
                       len(no_id), id_column, no_id[:10])
    return out


def _checked(rid: str, text: str | None) -> Report:
    text = (text or "").strip()
    return Report(rid, text, None if text else "empty report")


@dataclass
class Job:
    """Everything a worker thread needs."""

    backend: Any
    budget: TokenBudget
    log: JsonlLog
    fit_retries: int
    stop: threading.Event
    steps: dict = field(default_factory=dict)  # (report_id, index) -> recorded partial steps

    @property
    def checkpoints(self) -> bool:
        """Record partial steps only for backends whose calls are paid (API calls)."""
        return getattr(self.backend, "client_usage", None) is not None

    def record_step(self, report: Report, index: int, status: str, **fields: Any) -> None:
        """Append a partial step (``key_points`` or ``misfit``) of a pair."""
        if self.checkpoints:
            self.log.append({"report_id": report.report_id, "summary_index": index,
                             "status": status, "model": self.backend.model,
                             "prompt_version": self.backend.prompt_version, **fields})


def summarize_one(job: Job, report: Report, index: int) -> dict:
    """Summarize ``report`` once (summary ``index``), append the record, return it."""
    if job.stop.is_set():
        return {"status": "cancelled"}
    try:
        return _summarize_one(job, report, index)
    except FatalAPIError:
        job.stop.set()  # at once, so no other thread starts a doomed request
        raise


def _summarize_one(job: Job, report: Report, index: int) -> dict:
    usage = Usage()
    label = f"{report.report_id}#{index}"
    done = job.steps.get((report.report_id, index), {})
    key_points = done.get("key_points")
    if key_points is None:
        key_points = job.backend.key_points(report.text, usage, label)
        job.record_step(report, index, "key_points", key_points=key_points,
                        usage=usage.as_dict())
    res = None
    first = min(done.get("misfits", 0), job.fit_retries)  # misfits recorded by a killed run
    for attempt in range(first, job.fit_retries + 1):
        res = job.backend.summary(report.text, key_points, usage, label)
        n_tokens = job.budget.count(res.content)
        if res.content and n_tokens <= job.budget.max_tokens:
            break
        logger.warning("%s: summary of %d CLIP tokens with the prefix (budget %d)%s", label,
                       n_tokens, job.budget.max_tokens,
                       ", regenerating" if attempt < job.fit_retries else ", flagged")
        if attempt < job.fit_retries:
            job.record_step(report, index, "misfit", attempt=attempt + 1, text=res.content,
                            clip_tokens=n_tokens)
    record = {
        "report_id": report.report_id, "summary_index": index, "status": "ok",
        "text": res.content, "model": job.backend.model,
        "prompt_version": job.backend.prompt_version, "usage": usage.as_dict(),
        "clip_tokens": n_tokens, "fits": bool(res.content) and n_tokens <= job.budget.max_tokens,
        "finish_reason": res.finish_reason, "attempts": attempt + 1, "key_points": key_points,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if not res.content:
        record.update(status="error", reason="the model returned an empty summary",
                      retryable=True)
    job.log.append(record)
    return record


def _partial_steps(records: list[dict], backend: Any) -> dict:
    """Recorded key points and misfit counts of unfinished pairs, for this model and prompt."""
    steps: dict = {}
    for r in records:
        if (r.get("model"), r.get("prompt_version")) != (backend.model, backend.prompt_version):
            continue
        pair = (r.get("report_id"), r.get("summary_index"))
        if r.get("status") == "key_points" and r.get("key_points"):
            steps.setdefault(pair, {})["key_points"] = r["key_points"]
        elif r.get("status") == "misfit":
            step = steps.setdefault(pair, {})
            step["misfits"] = max(step.get("misfits", 0), int(r.get("attempt", 0)))
    return steps


def _done_pairs(records: list[dict]) -> tuple[set[tuple[str, int]], set[str], set[str]]:
    done = {(r["report_id"], r["summary_index"]) for r in records if r.get("status") == "ok"}
    input_errors = {r["report_id"] for r in records
                    if r.get("status") == "error" and r.get("summary_index") is None}
    producers = {f"{r.get('model')} / prompt {r.get('prompt_version')}" for r in records
                 if r.get("status") == "ok"}
    return done, input_errors, producers


def run(reports: list[Report], backend: Any, budget: TokenBudget, out: Path, n_summaries: int,
        concurrency: int = 4, fit_retries: int = 2) -> RunSummary:
    """Summarize every (report, index) not yet in ``out``; returns the run summary."""
    log = JsonlLog(out)
    log.repair()
    records = log.records()
    done, input_errors, producers = _done_pairs(records)
    current = f"{backend.model} / prompt {backend.prompt_version}"
    if producers - {current}:
        logger.warning("%s already holds summaries from %s; they count as done (write to a new "
                       "file to redo them with %s)", out, sorted(producers - {current}), current)
    summary = RunSummary("summarize_reports")
    for r in reports:
        if r.error is not None:
            summary.failed[r.report_id] = r.error
            if r.report_id not in input_errors:
                log.append({"report_id": r.report_id, "summary_index": None, "status": "error",
                            "reason": r.error, "retryable": False, "model": backend.model,
                            "prompt_version": backend.prompt_version})
    todo = [(r, i) for r in reports if r.error is None for i in range(n_summaries)
            if (r.report_id, i) not in done]
    summary.skipped = [f"{r.report_id}#{i}" for r in reports if r.error is None
                       for i in range(n_summaries) if (r.report_id, i) in done]
    job = Job(backend, budget, log, fit_retries, threading.Event(),
              _partial_steps(records, backend))
    usage = Usage()
    summary.extra["flagged misfits"] = 0
    try:
        _run_pool(job, todo, concurrency, summary, usage)
    except KeyboardInterrupt:
        summary.extra["interrupted"] = "yes: in-flight summaries were recorded; rerun to resume"
    _add_usage(summary, backend, usage)
    summary.extra["output"] = str(out)
    return summary


def _run_pool(job: Job, todo: list, concurrency: int, summary: RunSummary, usage: Usage) -> None:
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="summarize")
    futures: dict = {}
    bar = tqdm(total=len(todo), desc="summaries", unit="summary")
    try:
        for r, i in todo:
            futures[pool.submit(summarize_one, job, r, i)] = (r, i)
        for fut in as_completed(futures):
            r, i = futures[fut]
            name = f"{r.report_id}#{i}"
            bar.update(1)
            try:
                rec = fut.result()
            except FatalAPIError as e:
                job.stop.set()
                summary.failed[name] = f"fatal API error, run stopped: {scrub(str(e))}"
                continue
            except Exception as e:  # one failed pair must not stop the others
                summary.failed[name] = scrub(f"{type(e).__name__}: {e}")
                continue
            if rec["status"] == "cancelled":
                summary.failed[name] = "not attempted (run stopped)"
                continue
            usage.add(rec["usage"]["prompt_tokens"], rec["usage"]["completion_tokens"])
            if rec["status"] == "ok":
                summary.done.append(name)
                summary.extra["flagged misfits"] += 0 if rec["fits"] else 1
            else:
                summary.failed[name] = rec["reason"]
    except KeyboardInterrupt:
        logger.warning("interrupted: finishing the requests in flight, then stopping")
        job.stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        bar.close()
        pool.shutdown(wait=True)


def _add_usage(summary: RunSummary, backend: Any, usage: Usage) -> None:
    """Tokens and cost of this run: every successful API call (also of unfinished pairs)."""
    client_usage = getattr(backend, "client_usage", None)
    paid = client_usage if client_usage is not None else usage
    summary.extra["model"] = backend.model
    summary.extra["tokens (prompt / completion)"] = (f"{paid.prompt_tokens} / "
                                                     f"{paid.completion_tokens}")
    if client_usage is not None:
        summary.extra["API calls ok (retried)"] = f"{client_usage.calls} ({client_usage.retries})"
    summary.extra["estimated cost (USD)"] = estimate_cost(backend.model, paid, backend.prices)


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(prog="python -m data_prep.summarize_reports", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reports", type=Path, help="reports CSV or a folder of .txt files")
    p.add_argument("--out", type=Path, required=True, help="summaries JSONL (appended to)")
    p.add_argument("--id-column", default="patient_filename", help="CSV report id column")
    p.add_argument("--text-column", default="text", help="CSV report text column")
    p.add_argument("--backend", choices=["openai", "local", "auto"], default="openai",
                   help="openai: any OpenAI-compatible server; local: the extractive stand-in "
                        "(not an LLM); auto: openai when a key or --base-url is set, else local")
    p.add_argument("--model", default="gpt-3.5-turbo", help="chat model (default: %(default)s)")
    p.add_argument("--base-url", default=None,
                   help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1 (vLLM), "
                        "http://localhost:11434/v1 (Ollama)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default: %(default)s)")
    p.add_argument("--n-summaries", type=positive_int, default=1,
                   help="independent summaries per report (5 for the ablation)")
    p.add_argument("--prompt-version", default="v1", help="prompt files <part>_<version>.txt")
    p.add_argument("--prompt-dir", type=Path, default=None,
                   help="folder with system_/keypoints_/summary_<version>.txt (default: bundled)")
    p.add_argument("--max-tokens", type=positive_int, default=154,
                   help="max_tokens of the final summary answer (default: %(default)s)")
    p.add_argument("--temperature", type=float_in(0.0, 2.0), default=None,
                   help="sampling temperature")
    p.add_argument("--concurrency", type=positive_int, default=4, help="parallel requests")
    p.add_argument("--max-retries", type=non_negative_int, default=6, help="retries per request")
    p.add_argument("--backoff-base", type=non_negative_float, default=1.0,
                   help="first backoff delay (s)")
    p.add_argument("--backoff-max", type=non_negative_float, default=60.0,
                   help="longest backoff delay (s)")
    p.add_argument("--timeout", type=positive_float, default=60.0, help="request timeout (s)")
    p.add_argument("--fit-retries", type=non_negative_int, default=2,
                   help="regenerations of a summary that exceeds the CLIP token budget")
    p.add_argument("--clip-budget", type=positive_int, default=154,
                   help="CLIP tokens available to a caption, BOS/EOS included (default: 154)")
    p.add_argument("--price-table", type=Path, default=None,
                   help='JSON {"model": {"input": USD per 1M tokens, "output": ...}}')
    p.add_argument("--limit", type=positive_int, default=None,
                   help="only the first N reports (trials)")
    add_logging_arg(p)
    return p


def make_backend(args: argparse.Namespace) -> Any:
    """The summarizer chosen by ``--backend`` (and the environment for ``auto``)."""
    prices = load_price_table(args.price_table)
    api_key = os.environ.get(args.api_key_env) or None
    backend = args.backend
    if backend == "auto":
        backend = "openai" if (api_key or args.base_url) else "local"
        if backend == "local":
            logger.warning("no %s set and no --base-url: using the LOCAL EXTRACTIVE STAND-IN "
                           "(model %r), not an LLM", args.api_key_env, LOCAL_MODEL)
    if backend == "local":
        logger.warning("summaries come from the local extractive stand-in (%s), not an LLM",
                       LOCAL_MODEL)
        return LocalExtractiveBackend(TokenBudget(args.clip_budget), prices)
    if api_key is None:
        if args.base_url is None:
            raise SystemExit(f"error: set {args.api_key_env} in the environment (or pass "
                             "--base-url for a local server, or --backend local)")
        logger.info("no %s set: sending a placeholder key to %s", args.api_key_env, args.base_url)
        api_key = "no-key"
    policy = RetryPolicy(args.max_retries, args.backoff_base, args.backoff_max)
    prompts = Prompts.load(args.prompt_version, args.prompt_dir)
    return OpenAIBackend(args.model, api_key, prompts, base_url=args.base_url,
                         timeout=args.timeout, policy=policy, temperature=args.temperature,
                         max_tokens=args.max_tokens, prices=prices)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code (130 when interrupted)."""
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    if args.out.is_dir():
        raise SystemExit(f"error: --out {args.out} is a folder; give the JSONL file to write, "
                         f"e.g. {args.out / 'summaries.jsonl'}")
    try:
        reports = load_reports(args.reports, args.id_column, args.text_column)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from e
    if args.limit is not None:
        reports = reports[: args.limit]
    try:
        backend = make_backend(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from e
    budget = TokenBudget(args.clip_budget)
    logger.info("%d reports x %d summaries with %s -> %s", len(reports), args.n_summaries,
                backend.model, args.out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with output_lock(args.out):
            summary = run(reports, backend, budget, args.out, args.n_summaries,
                          args.concurrency, args.fit_retries)
    except OutputLocked as e:
        raise SystemExit(f"error: {e}") from e
    code = summary.report()
    return 130 if "interrupted" in summary.extra else code


if __name__ == "__main__":
    sys.exit(main())
