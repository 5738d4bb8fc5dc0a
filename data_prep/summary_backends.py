"""Summarizers for ``summarize_reports``: the two-step LLM chain and a local extractive stand-in.

Also the CLIP token budget check and the price table for the cost estimate.
"""
from __future__ import annotations

import importlib.util
import json
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from data_prep.llm import ChatClient, ChatResult, RetryPolicy, Usage
from ldm.data.captions import LEVEL_NAMES, caption_from_levels

LOCAL_MODEL = "local-extractive-standin"
PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
# USD per 1M tokens; check current prices and override with --price-table.
DEFAULT_PRICES: dict[str, dict[str, float]] = {
    "gpt-3.5-turbo": {"input": 0.50, "output": 1.50},
    "gpt-4o-mini": {"input": 0.15, "output": 0.60},
    "gpt-4o": {"input": 2.50, "output": 10.00},
    "gpt-4.1-mini": {"input": 0.40, "output": 1.60},
    LOCAL_MODEL: {"input": 0.0, "output": 0.0},
}

_TOKENIZER = None
_TOKENIZER_LOCK = threading.Lock()


def _simple_tokenizer_class() -> type:
    """open_clip's ``SimpleTokenizer`` class without importing all of open_clip (seconds)."""
    if "open_clip" in sys.modules:
        from open_clip.tokenizer import SimpleTokenizer

        return SimpleTokenizer
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip is needed to count CLIP tokens: pip install open_clip_torch")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer.py"
    name = "_open_clip_tokenizer_standalone"  # tokenizer.py has no relative imports
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    mod_spec.loader.exec_module(module)
    return module.SimpleTokenizer


def clip_tokenizer():
    """open_clip's ``SimpleTokenizer`` (bundled BPE vocabulary, offline), loaded once."""
    global _TOKENIZER
    with _TOKENIZER_LOCK:
        if _TOKENIZER is None:
            _TOKENIZER = _simple_tokenizer_class()()
    return _TOKENIZER


class TokenBudget:
    """Does a summary fit ``max_tokens`` CLIP tokens behind the longest caption prefix?"""

    def __init__(self, max_tokens: int = 154, n_levels: int = 2) -> None:
        longest = max(LEVEL_NAMES[n_levels], key=len)
        self.max_tokens = max_tokens
        self.prefix = caption_from_levels(longest, longest, "")  # "high tumor; high til; "

    def count(self, summary: str) -> int:
        """CLIP tokens of prefix + summary, BOS and EOS included."""
        caption = self.prefix + summary.strip()
        return len(clip_tokenizer().encode(caption)) + 2

    def fits(self, summary: str) -> bool:
        """True when the caption fits the budget."""
        return self.count(summary) <= self.max_tokens


@dataclass(frozen=True)
class Prompts:
    """A versioned prompt set: optional system prompt, key-points prompt, summary prompt."""

    version: str
    system: str
    keypoints: str
    summary: str

    @classmethod
    def load(cls, version: str = "v1", prompt_dir: Path | None = None) -> Prompts:
        """Read ``{system,keypoints,summary}_<version>.txt`` from ``prompt_dir``."""
        d = Path(prompt_dir) if prompt_dir else PROMPT_DIR
        parts = {}
        for part in ("system", "keypoints", "summary"):
            f = d / f"{part}_{version}.txt"
            if not f.is_file():
                if part == "system":
                    parts[part] = ""
                    continue
                raise FileNotFoundError(f"prompt file not found: {f} (--prompt-version "
                                        f"{version!r}, --prompt-dir {d})")
            parts[part] = f.read_text(encoding="utf-8").strip()
        if "{report}" not in parts["keypoints"]:
            raise ValueError(f"{d / f'keypoints_{version}.txt'} must contain the placeholder "
                             "{report}")
        return cls(version, **parts)

    def first_turn(self, report: str) -> list[dict[str, str]]:
        """Messages of the key-points request."""
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + [{"role": "user", "content": self.keypoints.replace("{report}", report)}]


class OpenAIBackend:
    """The paper's chain: key points first, then a 75-word summary in the same conversation."""

    def __init__(self, model: str, api_key: str, prompts: Prompts, base_url: str | None = None,
                 timeout: float = 60.0, policy: RetryPolicy | None = None,
                 temperature: float | None = None, max_tokens: int = 154,
                 prices: dict | None = None) -> None:
        self.client = ChatClient(model, api_key, base_url, timeout, policy, temperature)
        self.model = model
        self.prompts = prompts
        self.prompt_version = prompts.version
        self.max_tokens = max_tokens
        self.prices = prices if prices is not None else DEFAULT_PRICES

    @property
    def client_usage(self) -> Usage:
        """Calls, retries and tokens of every request so far."""
        return self.client.usage

    def key_points(self, report: str, usage: Usage, label: str) -> str:
        """First turn: the report's key points."""
        res = self.client.chat(self.prompts.first_turn(report), None, f"{label} key points")
        usage.add(res.prompt_tokens, res.completion_tokens, calls=1)
        if not res.content:
            raise RuntimeError("the model returned empty key points")
        return res.content

    def summary(self, report: str, key_points: str, usage: Usage, label: str) -> ChatResult:
        """Second turn, same conversation: the summary, capped at ``max_tokens``."""
        msgs = self.prompts.first_turn(report) + [
            {"role": "assistant", "content": key_points},
            {"role": "user", "content": self.prompts.summary},
        ]
        res = self.client.chat(msgs, self.max_tokens, f"{label} summary")
        usage.add(res.prompt_tokens, res.completion_tokens, calls=1)
        return res


KEYWORDS = (
    "carcinoma", "invasive", "infiltrating", "ductal", "lobular", "in situ", "dcis", "grade",
    "tumor", "tumour", "size", "cm", "margin", "lymph", "node", "metasta", "lymphovascular",
    "angiolymphatic", "estrogen", "progesterone", "her2", "her-2", "receptor", "necrosis",
    "mitotic", "nuclear", "differentiated", "calcification", "lesion", "mastectomy", "lumpectomy",
    "biopsy", "benign", "malignant", "stroma", "lymphocyt", "inflamm",
)


def _split_sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text).strip()
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if len(s.split()) >= 3]


def _score(sentence: str) -> int:
    low = sentence.lower()
    return sum(1 for k in KEYWORDS if k in low)


def extractive_summary(report: str, budget: TokenBudget, max_words: int = 75) -> str:
    """Highest-keyword sentences of ``report`` in their original order, within both budgets."""
    sentences = _split_sentences(report) or [re.sub(r"\s+", " ", report).strip()]
    scores = [_score(s) for s in sentences]
    order = sorted(range(len(sentences)), key=lambda i: (-scores[i], i))
    if max(scores) > 0:  # sentences without a diagnostic keyword only when nothing else
        order = [i for i in order if scores[i] > 0]
    chosen: list[int] = []
    for i in order:
        trial = sorted(chosen + [i])
        text = " ".join(sentences[j] for j in trial)
        if len(text.split()) <= max_words and budget.fits(text):
            chosen = trial
    if chosen:
        return " ".join(sentences[j] for j in chosen)
    words = sentences[order[0]].split()[:max_words]  # one long sentence: cut it to fit
    while words and not budget.fits(" ".join(words)):
        words = words[: -max(1, len(words) // 10)]
    return " ".join(words)


class LocalExtractiveBackend:
    """A local stand-in for the LLM (no network, no cost): extractive, deterministic."""

    model = LOCAL_MODEL
    prompt_version = "extractive-v1"

    def __init__(self, budget: TokenBudget, prices: dict | None = None) -> None:
        self.budget = budget
        self.prices = prices if prices is not None else DEFAULT_PRICES

    def key_points(self, report: str, usage: Usage, label: str) -> str:
        """The stand-in has no key-point step."""
        return ""

    def summary(self, report: str, key_points: str, usage: Usage, label: str) -> ChatResult:
        """Extractive summary within the token budget."""
        return ChatResult(extractive_summary(report, self.budget), "stop", 0, 0)


def load_price_table(path: Path | None) -> dict[str, dict[str, float]]:
    """Built-in prices, updated from a JSON file ``{"model": {"input": x, "output": y}}``."""
    prices = {k: dict(v) for k, v in DEFAULT_PRICES.items()}
    if path is not None:
        try:
            extra = json.loads(Path(path).read_text(encoding="utf-8"))
            for model, p in extra.items():
                prices[model] = {"input": float(p["input"]), "output": float(p["output"])}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: bad price table ({e}); expected "
                             '{"model": {"input": USD per 1M, "output": USD per 1M}}') from e
    return prices


def estimate_cost(model: str, usage: Any, prices: dict[str, dict[str, float]]) -> str:
    """Cost of ``usage`` under the longest price-table key that prefixes ``model``."""
    keys = [k for k in prices if model.startswith(k)]
    if not keys:
        return f"unknown (no price for {model!r}; pass --price-table)"
    p = prices[max(keys, key=len)]
    cost = usage.prompt_tokens * p["input"] / 1e6 + usage.completion_tokens * p["output"] / 1e6
    return f"{cost:.4f} (at ${p['input']:g} / ${p['output']:g} per 1M tokens in / out)"
