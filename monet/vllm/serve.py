"""OpenAI-compatible serving with latent decoding: vLLM's own ``serve`` entry point plus

* ``--worker-cls monet.vllm.worker.LatentWorker`` and ``--additional-config {"monet": ...}``,
* ``--middleware monet.vllm.serve.LatentSpanMiddleware`` (an ASGI middleware vLLM installs itself).

The middleware, for ``/v1/chat/completions`` and ``/v1/completions``:

* strips a trailing START from a completion prompt and sets ``monet_force_start`` (START is then
  forced as the first generated token, exactly as a sampled START), and sets a prefix-cache salt
  (see :func:`monet.vllm.llm.cache_salt`) unless the client gave one; per-request latent settings
  (``vllm_xargs: {"monet_latent_size": K, "monet_layout": L}``) are validated by vLLM itself after
  authentication (HTTP 400 naming the key, see :mod:`monet.vllm.validation`),
* renders each latent span of the answer as ``<abs_vis_token><latent></abs_vis_token>``: it asks
  vLLM for the generated token ids (removed again unless the client asked for them with
  ``return_token_ids``); non-streaming answers are re-decoded with
  :func:`monet.render.render_latent_text`, streamed chunks that carry latent tokens are rewritten
  by :class:`StreamRenderer` (chunks without them pass through untouched), so the concatenated
  stream equals the non-streaming text.
"""

from __future__ import annotations

import json
from typing import Any

from monet.layout import SpanLayout
from monet.vllm.settings import EngineSettings
from monet.tokens import LatentTokenIds

MIDDLEWARE = "monet.vllm.serve.LatentSpanMiddleware"
_PATHS = ("/v1/chat/completions", "/v1/completions")


def prompt_text_of(body: dict) -> str:
    """The text a request's prompt carries (messages' text parts, or the completion prompt)."""
    if "messages" in body:
        parts = []
        for m in body.get("messages") or []:
            c = m.get("content") if isinstance(m, dict) else None
            if isinstance(c, str):
                parts.append(c)
            elif isinstance(c, list):
                parts += [p.get("text", "") for p in c if isinstance(p, dict) and p.get("type") == "text"]
        # chat prompts end with the assistant header, never with START
        return "\n".join(parts) + "\n"
    p = body.get("prompt")
    return p if isinstance(p, str) else ""


def prepare_request(body: dict, defaults: SpanLayout, start_id: int | None = None) -> tuple[dict, bool]:
    """Strip a trailing START from a completion prompt (forcing START as the first generated token,
    like ``LatentLLM``), add the prefix-cache salt, and ask for token ids so the answer can be rendered.

    Settings are not *validated* here: vLLM does it after authentication (through
    :mod:`monet.vllm.validation`), so a bad value gets HTTP 400 and an unauthenticated request 401.
    Returns the new body and whether the client itself asked for token ids."""
    from monet.model.requests import strip_trailing_start
    from monet.vllm.llm import cache_salt
    from monet.vllm.settings import CONFIG_KEY, parse_request_settings

    body = dict(body)
    xargs = body.get("vllm_xargs")
    try:
        settings = parse_request_settings(xargs, defaults)
    except (TypeError, ValueError):
        settings = None  # vLLM answers 400 with the validator's message
    if settings is not None and "messages" not in body:
        prompt, forced = body.get("prompt"), False
        if isinstance(prompt, str):
            prompt, forced = strip_trailing_start(prompt)
        elif isinstance(prompt, list) and prompt and start_id is not None and prompt[-1] == start_id \
                and all(isinstance(t, int) for t in prompt):
            prompt, forced = prompt[:-1], True
        if forced:
            body["prompt"] = prompt
            body["vllm_xargs"] = {**(xargs or {}), f"{CONFIG_KEY}_force_start": True}
    if settings is not None and not body.get("cache_salt"):
        body["cache_salt"] = cache_salt(prompt_text_of(body), settings.layout)
    wanted_ids = bool(body.get("return_token_ids"))
    body["return_token_ids"] = True
    return body, wanted_ids


def render_response(payload: dict, tokenizer: Any, ids: LatentTokenIds, keep_ids: bool) -> dict:
    """Replace each choice's text by its rendering with latent span placeholders."""
    from monet.render import render_latent_text

    for choice in payload.get("choices") or []:
        toks = choice.get("token_ids")
        if toks is None:
            continue
        text = render_latent_text(tokenizer, toks, ids)
        if isinstance(choice.get("message"), dict):
            choice["message"]["content"] = text
        elif "text" in choice:
            choice["text"] = text
        if not keep_ids:
            choice.pop("token_ids", None)
    if not keep_ids:
        payload.pop("prompt_token_ids", None)
        for choice in payload.get("choices") or []:
            choice.pop("prompt_token_ids", None)
    return payload


class StreamRenderer:
    """Rewrites streamed chunks: START opens ``<abs_vis_token><latent>``, PADs add nothing, END
    closes ``</abs_vis_token>`` (a span continued from a prompt ending with START opens at its first
    PAD). State is kept per choice index across chunks."""

    def __init__(self, tokenizer: Any, ids: LatentTokenIds, keep_ids: bool):
        self.tokenizer, self.ids, self.keep_ids = tokenizer, ids, keep_ids
        self.latent = {ids.start, ids.pad, ids.end}
        self.open: dict[int, bool] = {}

    def render_piece(self, index: int, toks: list[int]) -> str:
        from monet.tokens import LATENT_END, LATENT_PLACEHOLDER, LATENT_START

        out, text = [], []
        for t in toks:
            if t not in self.latent:
                text.append(t)
                continue
            if text:
                out.append(self.tokenizer.decode(text, skip_special_tokens=True))
                text = []
            if not self.open.get(index):
                out.append(LATENT_START + LATENT_PLACEHOLDER)
                self.open[index] = True
            if t == self.ids.end:
                out.append(LATENT_END)
                self.open[index] = False
        if text:
            out.append(self.tokenizer.decode(text, skip_special_tokens=True))
        return "".join(out)

    def chunk(self, data: dict) -> dict:
        from monet.tokens import LATENT_END

        for choice in data.get("choices") or []:
            toks = choice.get("token_ids") or []
            index = choice.get("index", 0)
            delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else None
            text = None
            if any(t in self.latent for t in toks):
                text = self.render_piece(index, toks)
            if choice.get("finish_reason") and self.open.get(index):  # span cut by max_tokens
                text = (text if text is not None else (delta.get("content") if delta else choice.get("text")) or "")
                text += LATENT_END
                self.open[index] = False
            if text is not None:
                if delta is not None:
                    delta["content"] = text
                else:
                    choice["text"] = text
            if not self.keep_ids:
                choice.pop("token_ids", None)
                choice.pop("prompt_token_ids", None)
        if not self.keep_ids:
            data.pop("prompt_token_ids", None)
        return data

    def event(self, raw: bytes) -> bytes:
        """One SSE event (``data: {...}``) rewritten; anything else unchanged."""
        if not raw.startswith(b"data: ") or raw.strip() == b"data: [DONE]":
            return raw
        try:
            data = json.loads(raw[len(b"data: "):])
        except ValueError:
            return raw
        return b"data: " + json.dumps(self.chunk(data)).encode()


class LatentSpanMiddleware:
    """Pure ASGI middleware (vLLM installs it with ``app.add_middleware``)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self._tokenizer = None
        self._ids: LatentTokenIds | None = None
        self._engine: EngineSettings | None = None

    def _setup(self, scope: dict) -> None:
        if self._engine is not None:
            return
        state = scope["app"].state
        cfg = state.vllm_config
        self._engine = EngineSettings.from_vllm_config(cfg)
        from transformers import AutoTokenizer

        mc = cfg.model_config
        self._tokenizer = AutoTokenizer.from_pretrained(mc.tokenizer, revision=mc.tokenizer_revision)
        self._ids = LatentTokenIds.from_tokenizer(self._tokenizer)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or not scope.get("path", "").endswith(_PATHS):
            return await self.app(scope, receive, send)
        self._setup(scope)
        chunks = []
        while True:
            msg = await receive()
            chunks.append(msg.get("body", b""))
            if not msg.get("more_body"):
                break
        raw = b"".join(chunks)
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        if not isinstance(body, dict):  # vLLM answers (401 before 400) with its own message
            return await self.app(scope, _replay(raw, receive), send)
        body, keep_ids = prepare_request(body, self._engine.layout, self._engine.start_id)
        new_raw = json.dumps(body).encode()
        receive_body = _replay(new_raw, receive)
        if body.get("stream"):
            return await self._stream(scope, receive_body, send, keep_ids)

        start: dict = {}
        out: list[bytes] = []

        async def capture(msg):
            if msg["type"] == "http.response.start":
                start.update(msg)
            elif msg["type"] == "http.response.body":
                out.append(msg.get("body", b""))
                if not msg.get("more_body"):
                    payload = b"".join(out)
                    if start.get("status") == 200:
                        try:
                            data = render_response(json.loads(payload), self._tokenizer, self._ids, keep_ids)
                            payload = json.dumps(data).encode()
                        except (ValueError, KeyError, TypeError) as e:  # never hand out an unrendered answer silently
                            return await _send_json(send, 500, {"error": {
                                "message": f"monet: could not render the latent spans of the answer: "
                                           f"{type(e).__name__}: {e}", "type": "InternalServerError", "code": 500}})
                    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
                    headers.append((b"content-length", str(len(payload)).encode()))
                    await send({**start, "headers": headers})
                    await send({"type": "http.response.body", "body": payload, "more_body": False})
            else:
                await send(msg)

        await self.app(scope, receive_body, capture)


    async def _stream(self, scope, receive, send, keep_ids: bool) -> None:
        renderer = StreamRenderer(self._tokenizer, self._ids, keep_ids)
        status = {"code": 200}
        buf = b""

        async def forward(msg):
            nonlocal buf
            if msg["type"] == "http.response.start":
                status["code"] = msg.get("status", 200)
                await send(msg)
            elif msg["type"] == "http.response.body" and status["code"] == 200:
                buf += msg.get("body", b"")
                *events, buf = buf.split(b"\n\n")
                out = b"".join(renderer.event(e) + b"\n\n" for e in events)
                if not msg.get("more_body"):
                    out, buf = out + buf, b""
                await send({**msg, "body": out})
            else:
                await send(msg)

        await self.app(scope, receive, forward)


def _replay(body: bytes, receive):
    """An ASGI ``receive`` that hands out ``body`` once, then defers to the real one."""
    sent = False

    async def receive_body():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_body


async def _send_json(send, status: int, data: dict) -> None:
    payload = json.dumps(data).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def serve_argv(model: str, settings: dict, vllm_args: list[str]) -> list[str]:
    """``vllm serve`` arguments selecting the latent worker, settings and middleware."""
    for flag in ("--worker-cls", "--additional-config", "--speculative-config", "--pipeline-parallel-size", "-pp",
                 "--logits-processors"):
        if any(a == flag or a.startswith(flag + "=") for a in vllm_args):
            raise ValueError(f"{flag} cannot be combined with Monet latent serving")
    from monet.vllm.validation import VALIDATOR

    return [str(model), *vllm_args, "--worker-cls", "monet.vllm.worker.LatentWorker",
            "--additional-config", json.dumps({"monet": settings}), "--middleware", MIDDLEWARE,
            "--logits-processors", VALIDATOR]


def run_serve(model: str, *, latent_size: int | None = None, layout: str | None = None,
              max_latents_per_request: int | None = None, vllm_args: list[str] = ()) -> None:
    """Start vLLM's OpenAI-compatible server (blocks) with latent decoding."""
    from transformers import AutoProcessor
    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from monet.vllm.llm import check_runner_v1, load_settings
    from monet.vllm.settings import DEFAULT_MAX_LATENTS

    check_runner_v1()
    model = str(model)
    processor = AutoProcessor.from_pretrained(model)
    settings = load_settings(model, processor, latent_size, layout, max_latents_per_request or DEFAULT_MAX_LATENTS)
    parser = make_arg_parser(FlexibleArgumentParser(prog="monet serve"))
    args = parser.parse_args(serve_argv(model, settings.to_dict(), list(vllm_args)))
    cmd = ServeSubcommand()
    cmd.validate(args)
    cmd.cmd(args)
