"""Optional LLM judge over an OpenAI-compatible chat-completions endpoint.

Used only for outputs the rules cannot decide (see :class:`monet.scoring.scorer.Scorer`). For each
item the judge sees the question (with options), the reference answer and the tail of the model's
output, and must reply with one word, ``CORRECT`` or ``INCORRECT``. The reply is parsed into a
tri-state: ``correct`` / ``incorrect`` / ``unparseable`` (anything else, incl. both words or
neither).

Reliability:

* **timeout** per request (``timeout_s``), enforced by the HTTP client;
* **retries** with exponential backoff (``backoff_base_s * 2**attempt``, capped at
  ``backoff_max_s``) for timeouts, connection errors, HTTP 429 and 5xx, and responses that are not
  valid chat-completion JSON; other HTTP errors (400, 401, 404, ...) fail at once;
* a **concurrency** limit: at most ``concurrency`` requests in flight (a thread pool);
* an on-disk **verdict cache** (:class:`~monet.scoring.judge_cache.JudgeCache`) keyed by judge model,
  endpoint, prompt version, question, answer and prediction; only answered requests are cached
  (a transport failure is retried on the next run).

The API key comes from the environment variable *named* in the config (``api_key_env``), read
once when the judge is built, or from ``api_key`` in the config. It is never logged, never part of
``repr``/:meth:`JudgeConfig.to_dict`, never written to the cache or to reports. With neither set
(a local server that ignores auth) a placeholder key is sent.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

from monet.scoring.judge_cache import JudgeCache, cache_key

log = logging.getLogger(__name__)

PROMPT_VERSION = "monet-judge-v1"

SYSTEM_PROMPT = (
    "You grade answers to exam questions. You are given a question, the reference answer and a "
    "student's response. Decide whether the student's final answer agrees with the reference "
    "answer (same option, same value, or same meaning). Ignore the reasoning; judge only the final "
    "answer. Reply with exactly one word: CORRECT or INCORRECT."
)

_VERDICT_RE = re.compile(r"\b(CORRECT|INCORRECT)\b", re.IGNORECASE)


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to ask the judge. ``base_url`` is the OpenAI-compatible root (ending in
    ``/v1``). ``api_key`` is excluded from ``repr`` and :meth:`to_dict`."""

    model: str
    base_url: str
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float = 30.0
    max_retries: int = 3
    backoff_base_s: float = 0.5
    backoff_max_s: float = 8.0
    concurrency: int = 4
    cache_path: str | None = None
    max_tokens: int = 8
    temperature: float = 0.0
    max_prediction_chars: int = 4000

    def __post_init__(self):
        if not self.model or not self.base_url:
            raise ValueError("JudgeConfig: model and base_url are required")
        if self.concurrency < 1:
            raise ValueError(f"JudgeConfig.concurrency must be >= 1, got {self.concurrency}")
        if self.max_retries < 0 or self.timeout_s <= 0:
            raise ValueError("JudgeConfig: max_retries must be >= 0 and timeout_s > 0")

    def resolve_api_key(self) -> str:
        """The key to send: ``api_key``, else the variable named by ``api_key_env`` (which must then
        be set), else a placeholder for endpoints without auth."""
        if self.api_key:
            return self.api_key
        if self.api_key_env:
            value = os.environ.get(self.api_key_env)
            if not value:
                raise ValueError(f"judge API key: environment variable {self.api_key_env!r} is not set")
            return value
        return "no-key"

    def to_dict(self) -> dict[str, Any]:
        """Settings for reports: everything but the key itself."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "api_key"}


@dataclass(frozen=True)
class JudgeItem:
    question: str
    answer: str
    prediction: str
    options: Mapping[str, str] | None = None


@dataclass(frozen=True)
class JudgeOutcome:
    """``verdict``: ``correct`` / ``incorrect`` / ``unparseable`` (reply not one of the two words) /
    ``error`` (no usable reply after retries). ``cached``: served from the cache. ``attempts``: HTTP
    requests made for this item."""

    verdict: str
    reply: str | None
    cached: bool
    attempts: int
    error: str | None = None


def parse_judge_reply(reply: str | None) -> str:
    """Tri-state parse: exactly one of the words CORRECT / INCORRECT (any case) -> that verdict;
    otherwise ``unparseable``."""
    if not reply:
        return "unparseable"
    words = {w.upper() for w in _VERDICT_RE.findall(reply)}
    if len(words) == 1:
        return words.pop().lower()
    return "unparseable"


def build_judge_messages(item: JudgeItem, max_prediction_chars: int) -> list[dict[str, str]]:
    pred = item.prediction
    if len(pred) > max_prediction_chars:  # the final answer is at the end
        pred = "..." + pred[-max_prediction_chars:]
    parts = [f"Question:\n{item.question}"]
    if item.options:
        parts.append("Options:\n" + "\n".join(f"{k}. {v}" for k, v in item.options.items()))
    parts.append(f"Reference answer:\n{item.answer}")
    parts.append(f"Student's response:\n{pred}")
    parts.append("Is the student's final answer correct? Reply CORRECT or INCORRECT.")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n\n".join(parts)}]


class LLMJudge:
    """Judge many items concurrently with caching; see the module docstring.

    ``judge_many(items) -> list[JudgeOutcome]`` in input order. ``stats`` counts requests, cache
    hits and failures.
    """

    def __init__(self, config: JudgeConfig):
        import openai  # optional dependency, only needed with a judge

        self.config = config
        self._openai = openai
        key = config.resolve_api_key()
        self._redact = key if len(key) >= 4 else None  # scrubbed from any error text we keep
        self._client = openai.OpenAI(api_key=key, base_url=config.base_url,
                                     timeout=config.timeout_s, max_retries=0)
        self._cache = JudgeCache(config.cache_path) if config.cache_path else None
        self._stats_lock = threading.Lock()
        self.stats = {"requests": 0, "cache_hits": 0, "errors": 0, "unparseable": 0}

    def __repr__(self) -> str:
        return f"LLMJudge({self.config!r})"

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def _retryable(self, exc: Exception) -> bool:
        o = self._openai
        if isinstance(exc, (o.APITimeoutError, o.APIConnectionError, o.RateLimitError,
                            o.InternalServerError, o.APIResponseValidationError)):
            return True
        if isinstance(exc, o.APIStatusError):
            return exc.status_code >= 500 or exc.status_code == 429
        return isinstance(exc, (ValueError, AttributeError, TypeError, IndexError))  # malformed body

    def _request(self, item: JudgeItem) -> JudgeOutcome:
        cfg = self.config
        messages = build_judge_messages(item, cfg.max_prediction_chars)
        last_error = None
        for attempt in range(cfg.max_retries + 1):
            self._count("requests")
            try:
                resp = self._client.chat.completions.create(
                    model=cfg.model, messages=messages, max_tokens=cfg.max_tokens,
                    temperature=cfg.temperature)
                reply = resp.choices[0].message.content
                if reply is None:
                    raise ValueError("chat completion without message content")
                return JudgeOutcome(parse_judge_reply(reply), reply, False, attempt + 1)
            except Exception as exc:  # noqa: BLE001 - classified below, never swallowed silently
                last_error = f"{type(exc).__name__}: {exc}"
                if self._redact:
                    last_error = last_error.replace(self._redact, "***")
                if not self._retryable(exc) or attempt == cfg.max_retries:
                    break
                delay = min(cfg.backoff_max_s, cfg.backoff_base_s * (2 ** attempt))
                log.warning("judge request failed (%s); retry %d/%d in %.2fs", type(exc).__name__,
                            attempt + 1, cfg.max_retries, delay)
                time.sleep(delay)
        self._count("errors")
        return JudgeOutcome("error", None, False, attempt + 1, last_error)

    def judge_one(self, item: JudgeItem) -> JudgeOutcome:
        key = None
        if self._cache is not None:
            key = cache_key(self.config.model, self.config.base_url, PROMPT_VERSION, item.question,
                            item.answer, item.prediction)
            hit = self._cache.get(key)
            if hit is not None:
                self._count("cache_hits")
                return JudgeOutcome(hit[0], hit[1], True, 0)
        out = self._request(item)
        if out.verdict == "unparseable":
            self._count("unparseable")
        if key is not None and out.verdict != "error":
            self._cache.put(key, out.verdict, out.reply)
        return out

    def judge_many(self, items: Sequence[JudgeItem]) -> list[JudgeOutcome]:
        if not items:
            return []
        with ThreadPoolExecutor(max_workers=min(self.config.concurrency, len(items))) as pool:
            return list(pool.map(self.judge_one, items))

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
        self._client.close()
