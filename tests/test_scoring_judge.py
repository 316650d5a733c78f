"""The LLM judge against a real local OpenAI-compatible HTTP server (http.server in a thread):
verdict parsing, retries on 500 / malformed JSON, timeouts, the concurrency limit, the on-disk
cache, and that the API key never reaches cache or report files."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from monet.eval.report import AccuracyRow, write_report
from monet.scoring import JudgeConfig, JudgeItem, LLMJudge, ScoreItem, Scorer, ScorerConfig, Verdict
from monet.scoring.judge import parse_judge_reply

SECRET = "sk-test-0123456789abcdef-SECRET"
OPTS = {"A": "red", "B": "blue"}


def completion(content):
    return {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": "judge",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class JudgeServer:
    """Modes by URL prefix (``/<mode>/v1/chat/completions``):
    ok (reply CORRECT when the student's response contains GOOD, else INCORRECT), slow (sleeps
    ``slow_s`` first), flaky (500 for the first two hits, then ok), always500, badjson (200 with a
    non-JSON body), unparseable (replies "Maybe."), http400, echo401 (401 echoing the Authorization
    header), barrier (waits until ``barrier_parties`` requests are in flight)."""

    def __init__(self):
        self.hits = {}
        self.auth = []
        self.inflight = 0
        self.max_inflight = 0
        self.lock = threading.Lock()
        self.slow_s = 2.0
        self.barrier = None
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, body, ctype="application/json"):
                data = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def do_POST(self):
                mode = self.path.strip("/").split("/")[0]
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    n = server.hits.get(mode, 0) + 1
                    server.hits[mode] = n
                    server.auth.append(self.headers.get("Authorization"))
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    reply = self._reply(mode, n, body)
                finally:
                    # leave the in-flight count before answering: the client may send its next
                    # request as soon as it has this response
                    with server.lock:
                        server.inflight -= 1
                self._send(*reply)

            def _reply(self, mode, n, body):
                user = body["messages"][-1]["content"]
                verdict = "CORRECT" if "GOOD" in user else "INCORRECT"
                if mode == "slow":
                    time.sleep(server.slow_s)
                if mode == "barrier":
                    try:
                        server.barrier.wait()
                    except threading.BrokenBarrierError:
                        return 500, {"error": "requests were not concurrent"}
                if mode == "always500" or (mode == "flaky" and n <= 2):
                    return 500, {"error": {"message": "boom"}}
                if mode == "badjson":
                    return 200, "{not json at all"
                if mode == "http400":
                    return 400, {"error": {"message": "bad request"}}
                if mode == "echo401":
                    return 401, {"error": {"message": f"bad key {self.headers.get('Authorization')}"}}
                if mode == "unparseable":
                    return 200, completion("Maybe.")
                return 200, completion(f" {verdict} ")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()

    def url(self, mode):
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{mode}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = JudgeServer()
    yield s
    s.close()


def cfg(server, mode, tmp_path=None, **kw):
    kw.setdefault("backoff_base_s", 0.01)
    kw.setdefault("backoff_max_s", 0.02)
    kw.setdefault("timeout_s", 5.0)
    return JudgeConfig(model="judge-model", base_url=server.url(mode),
                       cache_path=str(tmp_path / "judge.sqlite") if tmp_path else None, **kw)


def items(n=3):
    # ambiguous for the rules -> goes to the judge; GOOD marks the ones the server calls correct
    return [ScoreItem(f"red or blue {'GOOD' if i % 2 == 0 else 'BAD'} #{i}", "B", OPTS, question=f"q{i}")
            for i in range(n)]


@pytest.mark.parametrize("reply,verdict", [("CORRECT", "correct"), (" incorrect.", "incorrect"),
                                           ("Verdict: Correct", "correct"), ("CORRECT or INCORRECT", "unparseable"),
                                           ("Maybe", "unparseable"), ("", "unparseable"), (None, "unparseable"),
                                           ("INCORRECTLY", "unparseable")])
def test_parse_judge_reply(reply, verdict):
    assert parse_judge_reply(reply) == verdict


def test_judge_decides_only_what_rules_cannot(server, tmp_path):
    scorer = Scorer(ScorerConfig(judge=cfg(server, "ok", tmp_path)))
    batch = items(3) + [ScoreItem("The answer is B", "B", OPTS, question="rule one")]
    res = scorer.score_many(batch)
    assert [(r.verdict, r.decided_by) for r in res] == [
        (Verdict.CORRECT, "judge"), (Verdict.INCORRECT, "judge"), (Verdict.CORRECT, "judge"),
        (Verdict.CORRECT, "rule")]
    assert server.hits == {"ok": 3}           # the rule-decided item never reached the judge
    assert res[0].judge_reply.strip() == "CORRECT"
    scorer.close()


def test_cache_hits_skip_the_server(server, tmp_path):
    s1 = Scorer(ScorerConfig(judge=cfg(server, "ok", tmp_path)))
    first = s1.score_many(items(4))
    s1.close()
    assert server.hits["ok"] == 4
    s2 = Scorer(ScorerConfig(judge=cfg(server, "ok", tmp_path)))
    second = s2.score_many(items(4))
    assert server.hits["ok"] == 4              # all four from the cache
    assert [r.verdict for r in second] == [r.verdict for r in first]
    assert all(r.detail == "judge_cached" for r in second) and s2.judge.stats["cache_hits"] == 4
    s2.close()
    # a different judge model is a different key
    s3 = Scorer(ScorerConfig(judge=cfg(server, "ok", tmp_path).__class__(
        **{**cfg(server, "ok", tmp_path).__dict__, "model": "other-judge"})))
    s3.score_many(items(1))
    assert server.hits["ok"] == 5
    s3.close()


def test_retries_on_500_then_success(server):
    judge = LLMJudge(cfg(server, "flaky", max_retries=3))
    (out,) = judge.judge_many([JudgeItem("q", "B", "GOOD")])
    assert out.verdict == "correct" and out.attempts == 3 and server.hits["flaky"] == 3
    judge.close()


def test_retries_exhausted_stay_undecided_and_uncached(server, tmp_path):
    scorer = Scorer(ScorerConfig(judge=cfg(server, "always500", tmp_path, max_retries=2)))
    (r,) = scorer.score_many(items(1))
    assert (r.verdict, r.decided_by, r.detail) == (Verdict.INCORRECT, "undecided", "judge:error")
    assert "InternalServerError" in r.extra["judge_error"]
    assert server.hits["always500"] == 3
    scorer.score_many(items(1))                # errors are not cached: asked again
    assert server.hits["always500"] == 6
    scorer.close()


def test_malformed_json_is_retried_then_error(server):
    judge = LLMJudge(cfg(server, "badjson", max_retries=1))
    (out,) = judge.judge_many([JudgeItem("q", "B", "GOOD")])
    assert out.verdict == "error" and out.attempts == 2 and server.hits["badjson"] == 2
    judge.close()


def test_timeout(server):
    server.slow_s = 1.5
    judge = LLMJudge(cfg(server, "slow", timeout_s=0.2, max_retries=1))
    (out,) = judge.judge_many([JudgeItem("q", "B", "GOOD")])
    assert out.verdict == "error" and "Timeout" in out.error and out.attempts == 2
    judge.close()


def test_client_errors_are_not_retried(server):
    judge = LLMJudge(cfg(server, "http400", max_retries=3))
    (out,) = judge.judge_many([JudgeItem("q", "B", "GOOD")])
    assert out.verdict == "error" and out.attempts == 1 and server.hits["http400"] == 1
    judge.close()


def test_unparseable_reply_is_undecided(server, tmp_path):
    scorer = Scorer(ScorerConfig(judge=cfg(server, "unparseable", tmp_path)))
    (r,) = scorer.score_many(items(1))
    assert (r.decided_by, r.detail, r.judge_reply) == ("undecided", "judge:unparseable", "Maybe.")
    assert scorer.judge.stats["unparseable"] == 1
    scorer.close()


def test_concurrency_limit(server):
    limit = 3
    server.barrier = threading.Barrier(limit, timeout=20)
    judge = LLMJudge(cfg(server, "barrier", concurrency=limit, max_retries=0, timeout_s=30))
    outs = judge.judge_many([JudgeItem(f"q{i}", "B", "GOOD") for i in range(2 * limit)])
    # every request passed the barrier: `limit` requests really were in flight together ...
    assert [o.verdict for o in outs] == ["correct"] * (2 * limit)
    # ... and never more than the limit
    assert server.max_inflight == limit
    judge.close()


def test_api_key_from_named_env_never_written(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MONET_TEST_JUDGE_KEY", SECRET)
    config = cfg(server, "ok", tmp_path, api_key_env="MONET_TEST_JUDGE_KEY")
    assert SECRET not in repr(config) and SECRET not in json.dumps(config.to_dict())
    scorer = Scorer(ScorerConfig(judge=config))
    res = scorer.score_many(items(2))
    scorer.close()
    assert server.auth == [f"Bearer {SECRET}"] * 2            # the key was sent ...
    paths = write_report([AccuracyRow("B", "ALL", 2, 1, .5, .1, .9, .5, 0, 0, 2, 0)], tmp_path / "rep",
                         settings={"judge": config.to_dict(), "api_key": SECRET, "nested": {"openai_api_key": SECRET}},
                         extra={"results": [r.to_dict() for r in res]})
    written = [tmp_path / "judge.sqlite", *paths.values()]
    for p in written:                                          # ... and written nowhere
        assert SECRET.encode() not in p.read_bytes(), p
    rep = json.loads(paths["json"].read_text())
    assert rep["settings"]["judge"]["api_key_env"] == "MONET_TEST_JUDGE_KEY"


def test_api_key_echoed_by_server_is_redacted(server, monkeypatch):
    monkeypatch.setenv("MONET_TEST_JUDGE_KEY", SECRET)
    judge = LLMJudge(cfg(server, "echo401", api_key_env="MONET_TEST_JUDGE_KEY"))
    (out,) = judge.judge_many([JudgeItem("q", "B", "GOOD")])
    assert out.verdict == "error" and "***" in out.error and SECRET not in out.error
    judge.close()


def test_missing_env_var_is_named(server, monkeypatch):
    monkeypatch.delenv("MONET_TEST_JUDGE_KEY", raising=False)
    with pytest.raises(ValueError, match="MONET_TEST_JUDGE_KEY"):
        LLMJudge(cfg(server, "ok", api_key_env="MONET_TEST_JUDGE_KEY"))
    with pytest.raises(ValueError, match="MONET_TEST_JUDGE_KEY"):  # fails when built, before any scoring
        Scorer(ScorerConfig(judge=cfg(server, "ok", api_key_env="MONET_TEST_JUDGE_KEY")))
    assert server.hits == {}


def test_config_validation():
    with pytest.raises(ValueError):
        JudgeConfig(model="m", base_url="http://x/v1", concurrency=0)
    with pytest.raises(ValueError):
        JudgeConfig(model="", base_url="http://x/v1")
