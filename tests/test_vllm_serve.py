"""``monet serve``: vLLM's OpenAI-compatible server with the latent worker, on the tiny model (CPU)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from monet.render import SPAN_PLACEHOLDER
from monet.testing import build_tiny_checkpoint

pytest.importorskip("vllm", reason="vllm is installed by scripts/setup_env.sh (MONET_WITH_VLLM=1, the default)")

from monet.vllm.cli import add_serve_parser, split_serve_args  # noqa: E402
from monet.vllm.llm import cache_salt  # noqa: E402
from monet.vllm.serve import StreamRenderer, prepare_request, render_response, serve_argv  # noqa: E402

LAUNCH = """
import argparse, sys
from monet.vllm.cli import add_serve_parser
parser = argparse.ArgumentParser(prog="monet")
add_serve_parser(parser.add_subparsers(dest="command"))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


API_KEY = "sk-monet-test"


def _post(url: str, body, key: str | None = API_KEY) -> tuple[int, dict]:
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = str(build_tiny_checkpoint(cache=True))
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    argv = [sys.executable, "-c", LAUNCH, "serve", model, "--latent-size", "2", "--",
            "--port", str(port), "--host", "127.0.0.1", "--dtype", "float32", "--max-model-len", "512",
            "--enforce-eager", "--kv-cache-memory-bytes", str(64 << 20), "--limit-mm-per-prompt", '{"image": 1}',
            "--api-key", API_KEY]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server did not come up:\n{log.read_text()[-4000:]}")
            time.sleep(1)
        yield base, model
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (engine core + worker)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


def test_chat_completion_renders_spans(server):
    base, model = server
    start = 696  # tiny tokenizer: <abs_vis_token>
    status, data = _post(base + "/v1/chat/completions", {
        "model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 12,
        "logit_bias": {str(start): 5.0}, "vllm_xargs": {"monet_latent_size": 3}})
    assert status == 200, data
    text = data["choices"][0]["message"]["content"]
    assert SPAN_PLACEHOLDER in text and "<abs_vis_token_pad>" not in text
    assert "token_ids" not in data["choices"][0]  # only returned when the client asks


def test_completion_prompt_ending_in_start(server):
    base, model = server
    status, data = _post(base + "/v1/completions", {"model": model, "prompt": "hi <abs_vis_token>", "max_tokens": 6,
                                                    "temperature": 0.0, "return_token_ids": True})
    assert status == 200, data
    choice = data["choices"][0]
    pad, start, end = 695, 696, 697
    assert choice["token_ids"][:4] == [start, pad, pad, end]  # START forced first; engine default K = 2
    assert choice["text"].startswith(SPAN_PLACEHOLDER)
    # START stripped by the server == START forced by the client's own setting
    status, again = _post(base + "/v1/completions", {"model": model, "prompt": "hi ", "max_tokens": 6, "temperature": 0.0,
                                                     "return_token_ids": True, "vllm_xargs": {"monet_force_start": True}})
    assert status == 200 and again["choices"][0]["token_ids"] == choice["token_ids"], again


def _post_stream(url: str, body: dict) -> list[dict]:
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"content-type": "application/json", "authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=120) as r:
        raw = r.read().decode()
    events = [e[len("data: "):] for e in raw.split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.parametrize("endpoint", ["chat", "completion"])
def test_streamed_text_equals_rendered_text(server, endpoint):
    """Greedy: the concatenated stream shows the same placeholders as the non-streaming answer."""
    base, model = server
    start = 696
    if endpoint == "chat":
        url, body = base + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hello"}]}
        piece = lambda c: c.get("delta", {}).get("content") or ""  # noqa: E731
        whole = lambda d: d["choices"][0]["message"]["content"]  # noqa: E731
    else:  # prompt ends with START: the span opens in the prompt
        url, body = base + "/v1/completions", {"prompt": "hi <abs_vis_token>"}
        piece = lambda c: c.get("text") or ""  # noqa: E731
        whole = lambda d: d["choices"][0]["text"]  # noqa: E731
    body = {**body, "model": model, "max_tokens": 16, "temperature": 0.0, "logit_bias": {str(start): 4.0}}
    status, data = _post(url, body)
    assert status == 200, data
    chunks = _post_stream(url, body)
    streamed = "".join(piece(c["choices"][0]) for c in chunks if c.get("choices"))
    assert SPAN_PLACEHOLDER in whole(data)
    assert streamed == whole(data)
    assert all("token_ids" not in c for ch in chunks for c in ch.get("choices", []))


def test_bad_latent_settings_are_http_400(server):
    base, model = server
    chat = {"model": model, "messages": [{"role": "user", "content": "x"}]}
    for xargs, pattern in [({"monet_latent_size": 0}, "latent_size must be >= 1"),
                           ({"monet_latnt_size": 2}, "unknown Monet request settings"),
                           ({"monet_layout": "v9"}, "layout must be one of")]:
        status, data = _post(base + "/v1/chat/completions", {**chat, "vllm_xargs": xargs})
        assert status == 400 and pattern in data["error"]["message"], data
    status, data = _post(base + "/v1/chat/completions", {**chat, "vllm_xargs": [1, 2]})  # not an object
    assert status == 400, data
    # authentication comes first: no key -> 401, whatever the body holds
    for body in ({**chat, "vllm_xargs": {"monet_latent_size": 0}}, b"{not json", {**chat, "vllm_xargs": [1]}):
        status, data = _post(base + "/v1/chat/completions", body, key=None)
        assert status == 401, data
    # the engine is still fine afterwards
    status, _ = _post(base + "/v1/completions", {"model": model, "prompt": "ok", "max_tokens": 2})
    assert status == 200


def test_prepare_request_and_render_helpers():
    from monet.layout import SpanLayout

    four = SpanLayout(4)
    body, keep = prepare_request({"messages": [{"role": "user", "content": "q"}]}, four)
    assert body["return_token_ids"] is True and keep is False and body["cache_salt"] == "monet-k4-standard"
    body, _ = prepare_request({"prompt": "a <abs_vis_token_pad> b", "stream": True}, four)
    assert body["cache_salt"].startswith("monet-private-") and body["return_token_ids"] is True
    # a trailing START is stripped and forced (text and token-id prompts); the salt sees the stripped prompt
    body, _ = prepare_request({"prompt": "x<abs_vis_token>", "vllm_xargs": {"monet_layout": "monet-v1"}}, four, 7)
    assert body["prompt"] == "x" and body["vllm_xargs"] == {"monet_layout": "monet-v1", "monet_force_start": True}
    assert body["cache_salt"] == "monet-k4-monet-v1"
    body, _ = prepare_request({"prompt": [5, 6, 7]}, four, 7)
    assert body["prompt"] == [5, 6] and body["vllm_xargs"] == {"monet_force_start": True}
    # invalid settings pass through untouched: vLLM's validator answers 400 after authentication
    bad = {"prompt": "x<abs_vis_token>", "vllm_xargs": {"monet_layout": "v9"}}
    body, _ = prepare_request(bad, four, 7)
    assert body["prompt"] == bad["prompt"] and "cache_salt" not in body
    assert cache_salt("x", SpanLayout(3, "monet-v1")) == "monet-k3-monet-v1"
    assert cache_salt("<abs_vis_token> x", SpanLayout(3)).startswith("monet-private-")

    class Tok:
        def decode(self, ids, skip_special_tokens=True):
            return "".join(chr(ord("a") + i) for i in ids)

    from monet.tokens import LatentTokenIds

    ids = LatentTokenIds(pad=10, start=11, end=12, observation_start=13, observation_end=14)
    payload = {"choices": [{"message": {"content": "raw"}, "token_ids": [0, 11, 10, 12, 1]}], "prompt_token_ids": [1]}
    out = render_response(payload, Tok(), ids, keep_ids=False)
    assert out["choices"][0]["message"]["content"] == f"a{SPAN_PLACEHOLDER}b" and "prompt_token_ids" not in out

    # streaming: per-chunk rewriting concatenates to the same rendering
    for chunks, expected in (([[0], [11], [10], [12], [1]], f"a{SPAN_PLACEHOLDER}b"),
                             ([[10, 10], [12, 1]], f"{SPAN_PLACEHOLDER}b"),          # span opened by the prompt
                             ([[0, 11], [10]], f"a{SPAN_PLACEHOLDER}")):              # cut by max_tokens
        r = StreamRenderer(Tok(), ids, keep_ids=False)
        text = ""
        for i, toks in enumerate(chunks):
            last = i == len(chunks) - 1
            plain = "".join(chr(ord("a") + t) for t in toks if t < 10)
            event = b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": plain}, "token_ids": toks,
                                                          "finish_reason": "length" if last else None}]}).encode()
            data = json.loads(r.event(event)[len(b"data: "):])
            assert "token_ids" not in data["choices"][0]
            text += data["choices"][0]["delta"]["content"]
        assert text == expected
    assert StreamRenderer(Tok(), ids, keep_ids=False).event(b"data: [DONE]") == b"data: [DONE]"


def test_serve_argv_and_parser():
    argv = serve_argv("/m", {"latent_size": 2}, ["--port", "1"])
    assert argv[0] == "/m" and "--worker-cls" in argv and "monet.vllm.serve.LatentSpanMiddleware" in argv
    with pytest.raises(ValueError, match="speculative"):
        serve_argv("/m", {}, ["--speculative-config", "{}"])
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args, rest = split_serve_args(parser.parse_args(["serve", "/m", "--layout", "monet-v1", "--", "--port", "8000"]))
    assert args.layout == "monet-v1" and rest == ["--port", "8000"] and args.latent_size is None
    args, rest = split_serve_args(parser.parse_args(["serve", "--latent-size", "3", "/m"]))
    assert args.latent_size == 3 and rest == [] and args.model == "/m"


def test_unrenderable_answer_is_an_error_not_a_silent_pass_through():
    """A 200 answer the middleware cannot render becomes HTTP 500 naming the problem."""
    import asyncio

    from monet.layout import SpanLayout
    from monet.tokens import LatentTokenIds
    from monet.vllm.serve import LatentSpanMiddleware
    from monet.vllm.settings import EngineSettings

    async def app(scope, receive, send):  # a backend answering 200 with a body that is not JSON
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{not json", "more_body": False})

    mw = LatentSpanMiddleware(app)
    mw._engine = EngineSettings(pad_id=10, start_id=11, end_id=12, layout=SpanLayout(2))
    mw._tokenizer, mw._ids = object(), LatentTokenIds(pad=10, start=11, end=12, observation_start=13, observation_end=14)
    sent = []

    async def receive():
        return {"type": "http.request", "body": json.dumps({"prompt": "x"}).encode(), "more_body": False}

    async def send(msg):
        sent.append(msg)

    scope = {"type": "http", "method": "POST", "path": "/v1/completions"}
    asyncio.run(mw(scope, receive, send))
    assert sent[0]["status"] == 500
    assert b"could not render the latent spans" in sent[-1]["body"]
