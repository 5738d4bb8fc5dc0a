"""Chat-completions calls through the official ``openai`` client with our own retry policy.

The client is built with ``max_retries=0`` so every retry is visible here: exponential backoff
with jitter on 408/409/429/5xx, timeouts and connection errors, honouring ``Retry-After`` (and
``retry-after-ms``) when the server sends it.
"""
from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ldm.optional import LazyModule

openai = LazyModule("openai", "data", "Summarizing reports through an OpenAI-compatible API")

logger = logging.getLogger(__name__)
T = TypeVar("T")
RETRY_STATUS = {408, 409, 429}
FATAL_STATUS = {401, 403, 404}  # bad key, no access, unknown model: stop the whole run


class FatalAPIError(RuntimeError):
    """An error that will not go away by retrying or moving on (e.g. a bad API key)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``min(max_delay, base * 2**attempt)`` scaled by a jitter in [0.5, 1]."""

    max_retries: int = 6
    base_delay: float = 1.0
    max_delay: float = 60.0


@dataclass
class Usage:
    """Token counts, summed over calls (thread-safe ``add``)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    retries: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, prompt: int = 0, completion: int = 0, calls: int = 0, retries: int = 0) -> None:
        """Accumulate counts."""
        with self._lock:
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.calls += calls
            self.retries += retries

    def as_dict(self) -> dict[str, int]:
        """Plain counts for JSON."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` / ``retry-after`` (number or HTTP date), else None."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            parsed = email.utils.parsedate_tz(value)
            if parsed is not None:
                return max(0.0, email.utils.mktime_tz(parsed) - time.time())
    return None


def classify(exc: BaseException) -> tuple[bool, float | None, str]:
    """``(retryable, server-requested wait, short description)`` of an API exception."""
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        desc = f"HTTP {status}"
        if status in FATAL_STATUS:
            raise FatalAPIError(f"{desc}: {scrub(str(exc.message))}") from exc
        wait = retry_after_seconds(exc.response.headers)
        return status in RETRY_STATUS or status >= 500, wait, desc
    if isinstance(exc, openai.APITimeoutError):
        return True, None, "timeout"
    if isinstance(exc, openai.APIConnectionError):
        return True, None, "connection error"
    return False, None, f"{type(exc).__name__}: {exc}"


def call_with_retries(fn: Callable[[], T], policy: RetryPolicy, label: str,
                      usage: Usage | None = None,
                      sleep: Callable[[float], None] = time.sleep) -> T:
    """Call ``fn`` and retry retryable API errors per ``policy``; re-raise the last error."""
    for attempt in range(policy.max_retries + 1):
        try:
            return fn()
        except openai.OpenAIError as e:
            retryable, wait, desc = classify(e)
            if not retryable or attempt == policy.max_retries:
                raise
            if wait is None:
                wait = min(policy.max_delay, policy.base_delay * 2 ** attempt)
                wait *= random.uniform(0.5, 1.0)
            else:
                wait = min(wait, max(policy.max_delay, 0.0))
            logger.warning("%s: %s, retry %d/%d in %.2f s", label, desc, attempt + 1,
                           policy.max_retries, wait)
            if usage is not None:
                usage.add(retries=1)
            sleep(wait)
    raise AssertionError("unreachable")


_SECRETS: list[str] = []


def register_secret(value: str | None) -> None:
    """Remember a secret (the API key) so :func:`scrub` removes it from any text."""
    if value and value not in _SECRETS:
        _SECRETS.append(value)


def scrub(text: str) -> str:
    """``text`` with registered secrets replaced by ``***``."""
    for s in _SECRETS:
        text = text.replace(s, "***")
    return text


@dataclass
class ChatResult:
    """Content, finish reason and token usage of one chat completion."""

    content: str
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


class ChatClient:
    """Thin wrapper over ``OpenAI().chat.completions.create`` with retries and usage totals."""

    def __init__(self, model: str, api_key: str, base_url: str | None = None,
                 timeout: float = 60.0, policy: RetryPolicy | None = None,
                 temperature: float | None = None) -> None:
        register_secret(api_key)
        self.model = model
        self.policy = policy or RetryPolicy()
        self.temperature = temperature
        self.usage = Usage()
        self.client = openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout,
                                    max_retries=0)

    def chat(self, messages: list[dict[str, str]], max_tokens: int | None = None,
             label: str = "chat") -> ChatResult:
        """One completion of ``messages``, retried on transient errors."""
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages}
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature

        def once():
            return self.client.chat.completions.create(**kwargs)

        resp = call_with_retries(once, self.policy, label, self.usage)
        choice = resp.choices[0]
        u = resp.usage
        pt = int(getattr(u, "prompt_tokens", 0) or 0) if u is not None else 0
        ct = int(getattr(u, "completion_tokens", 0) or 0) if u is not None else 0
        self.usage.add(prompt=pt, completion=ct, calls=1)
        return ChatResult((choice.message.content or "").strip(), choice.finish_reason, pt, ct)
