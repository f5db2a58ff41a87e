"""The OpenAI-compatible ``EndpointGenerator`` against a real server (``mmretrieve.testing.openai_server``:
FastAPI + uvicorn on loopback, answering with a tiny random Qwen2-VL through ``LocalGenerator``): answers,
usage and the cache, retries on 429 / 5xx / timeouts, fast failure when unreachable, keys, concurrency."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from PIL import Image

from mmretrieve.errors import MLLMError, UsageError
from mmretrieve.rerank.endpoint import EndpointError, EndpointGenerator, encode_image
from mmretrieve.rerank.generate import LocalGenerator, Prompt, make_generator
from mmretrieve.testing import write_tiny_vlm
from mmretrieve.testing.openai_server import serve_openai

MAX_NEW = 8


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return write_tiny_vlm(tmp_path_factory.mktemp("endpoint_vlm"), "qwen2_vl")


@pytest.fixture(scope="module")
def module_server(model_dir):
    with serve_openai(model_dir, model_name="tiny", dtype="fp32") as server:
        yield server


@pytest.fixture()
def server(module_server):
    _settle(module_server)
    module_server.reset()
    yield module_server
    _settle(module_server)
    module_server.reset()


def _settle(server, limit: float = 5.0) -> None:
    """Wait for requests a client gave up on (a timeout test) to finish on the server."""
    end = time.monotonic() + limit
    while server.in_flight and time.monotonic() < end:
        time.sleep(0.02)


def _gen(url: str, **kw) -> EndpointGenerator:
    kw.setdefault("max_new_tokens", MAX_NEW)
    kw.setdefault("cache", False)
    kw.setdefault("backoff", 0.01)
    return EndpointGenerator(url, "tiny", **kw)


def _image(color=(200, 30, 30), size=(64, 48)) -> Image.Image:
    im = Image.new("RGB", size, color)
    for x in range(0, size[0], 8):  # some structure, not a flat colour
        for y in range(size[1]):
            im.putpixel((x, y), (x * 3 % 256, y * 5 % 256, 90))
    return im


def _prompts() -> list[Prompt]:
    return [Prompt(["Does this image match the description? a red car", _image(), "Answer Yes or No."]),
            Prompt(["a photo of a cat"]),
            Prompt(["The first image is the reference.", _image((10, 200, 10)), _image((10, 10, 200), (40, 40)),
                    "Do these two images show the same thing?"])]


def _closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# ---- answers ---------------------------------------------------------------------------------------
def test_answers_match_local_generation(server, model_dir):
    prompts = _prompts()
    gen = _gen(server.url, image_format="png")  # lossless images: the server sees the same pixels
    got = gen._generate(prompts)
    local = LocalGenerator(model_dir, cache=False, dtype="fp32", batch_size=1, max_new_tokens=MAX_NEW)
    want = local._generate(prompts)
    assert [g.text for g in got] == [w.text for w in want]
    assert [g.prompt_tokens for g in got] == [w.prompt_tokens for w in want]
    assert all(g.prompt_tokens > 0 and 0 < g.generated_tokens <= MAX_NEW + 1 for g in got)
    assert all(g.seconds > 0 for g in got)
    assert server.requests == len(prompts) == server.answered


def test_jpeg_images_answered_and_formats():
    assert encode_image(_image()).startswith("data:image/jpeg;base64,")
    assert encode_image(_image(), "png").startswith("data:image/png;base64,")
    assert encode_image(Image.new("RGBA", (8, 8), (1, 2, 3, 4))).startswith("data:image/png;base64,")
    assert encode_image(Image.new("CMYK", (8, 8))).startswith("data:image/jpeg;base64,")


def test_make_generator_cache_and_order(server, tmp_path):
    prompts = _prompts()
    gen = make_generator(what="test", api=server.url, api_model="tiny", max_new_tokens=MAX_NEW,
                         cache=str(tmp_path / "gen.sqlite"), concurrency=3, max_pixels=200_000)
    assert isinstance(gen, EndpointGenerator)
    assert gen.identity == f"endpoint|{server.url}|tiny"
    texts, cost = gen.generate(prompts, template="t")
    assert cost.prompts == 3 and cost.cache_hits == 0
    assert cost.prompt_tokens > 0 and cost.generated_tokens > 0 and cost.seconds > 0
    assert server.requests == 3
    # in input order: each answer is the one for its prompt alone
    alone = [gen._generate([p])[0].text for p in prompts]
    assert texts == alone
    seen = server.requests
    texts2, cost2 = gen.generate(prompts, template="t")
    assert texts2 == texts
    assert cost2.cache_hits == 3 and cost2.generated_tokens == 0 and cost2.prompt_tokens == 0
    assert server.requests == seen  # nothing sent


def test_usage_missing_is_estimated(server):
    gen = _gen(server.url)
    g = gen._generation({"choices": [{"message": {"content": "abcdefgh"}}]}, Prompt(["abcd", _image()]), 0.5)
    assert (g.text, g.prompt_tokens, g.generated_tokens, g.seconds) == ("abcdefgh", 1, 2, 0.5)
    with pytest.raises(EndpointError, match="choices"):
        gen._generation({"error": "nope"}, Prompt(["x"]), 0.1)


# ---- retries ---------------------------------------------------------------------------------------
def test_429_twice_then_success(server):
    server.fail_next(429, 2)  # Retry-After: 0
    gen = make_generator(what="test", api=server.url, api_model="tiny", max_new_tokens=MAX_NEW, cache=False, retries=3)
    texts, cost = gen.generate([Prompt(["a photo of a cat"])], template="t")
    assert texts[0] == _gen(server.url)._generate([Prompt(["a photo of a cat"])])[0].text
    assert server.requests == 4  # 2 refused + 1 answered + the reference
    assert cost.generated_tokens > 0


def test_retry_after_is_honoured(server):
    server.fail_next(429, 1, retry_after=1)
    t0 = time.monotonic()
    _gen(server.url, backoff=0.0)._generate([Prompt(["a dog"])])
    assert time.monotonic() - t0 >= 0.9
    assert server.requests == 2


def test_500_is_retried(server):
    server.fail_next(500, 1)
    out = _gen(server.url, retries=2)._generate([Prompt(["a dog"])])
    assert out[0].generated_tokens > 0
    assert server.requests == 2


def test_persistent_500_fails_clearly(server):
    server.fail_next(500, 10)
    with pytest.raises(EndpointError, match=r"HTTP 500") as e:
        _gen(server.url, retries=2)._generate([Prompt(["a dog"])])
    assert server.requests == 3
    assert e.value.status == 500
    assert server.url in str(e.value) and "3 tries" in str(e.value) and "injected failure" in str(e.value)
    assert isinstance(e.value, MLLMError)


def test_timeout_is_retried_then_fails(server):
    server.delay(1.5)
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match=r"no answer within 0.3 s") as e:
        _gen(server.url, timeout=0.3, retries=1)._generate([Prompt(["a dog"])])
    assert time.monotonic() - t0 < 1.4
    assert server.requests == 2
    assert e.value.status is None and "2 tries" in str(e.value)


def test_timeout_then_success(server):
    server.delay(1.0, n=1)
    out = _gen(server.url, timeout=0.4, retries=2)._generate([Prompt(["a dog"])])
    assert out[0].generated_tokens > 0
    assert server.requests == 2


def test_other_4xx_fails_at_once(server):
    gen = EndpointGenerator(server.url, "no-such-model", max_new_tokens=MAX_NEW, cache=False, retries=3)
    with pytest.raises(EndpointError, match=r"HTTP 404.*no-such-model") as e:
        gen._generate([Prompt(["a dog"])])
    assert e.value.status == 404
    assert server.requests == 1


# ---- reachability ----------------------------------------------------------------------------------
def test_unreachable_fails_fast():
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    gen = _gen(url, retries=5, backoff=1.0, timeout=30)
    t0 = time.monotonic()
    with pytest.raises(EndpointError, match=r"cannot be reached \(connection refused\); start the server or fix api="):
        gen.generate([Prompt(["a dog"])], template="t")
    assert time.monotonic() - t0 < 5
    assert url in str(gen._unreachable("x"))


def test_bad_api_url():
    with pytest.raises(UsageError, match="http"):
        _gen("127.0.0.1:8000/v1")
    with pytest.raises(UsageError, match="concurrency"):
        _gen("http://127.0.0.1:8000/v1", concurrency=0)


# ---- keys ------------------------------------------------------------------------------------------
def test_missing_key_env(monkeypatch, server):
    monkeypatch.delenv("MMR_TEST_ENDPOINT_KEY", raising=False)
    with pytest.raises(EndpointError, match="MMR_TEST_ENDPOINT_KEY"):
        _gen(server.url, api_key_env="MMR_TEST_ENDPOINT_KEY")
    assert server.requests == 0


def test_wrong_key_is_401_not_retried(monkeypatch, model_dir):
    with serve_openai(model_dir, api_key="s3cret-key") as keyed:
        monkeypatch.setenv("MMR_TEST_ENDPOINT_KEY", "wrong")
        gen = _gen(keyed.url, api_key_env="MMR_TEST_ENDPOINT_KEY", retries=3)
        with pytest.raises(EndpointError, match=r"HTTP 401.*Incorrect API key") as e:
            gen._generate([Prompt(["a dog"])])
        assert e.value.status == 401
        assert keyed.requests == 1
        monkeypatch.setenv("MMR_TEST_ENDPOINT_KEY", "s3cret-key")
        gen = _gen(keyed.url, api_key_env="MMR_TEST_ENDPOINT_KEY")
        assert gen._generate([Prompt(["a dog"])])[0].generated_tokens > 0
        assert keyed.requests == 2
        for shown in (repr(gen), str(vars(gen)), gen.identity, repr(gen.options())):
            assert "s3cret" not in shown


# ---- concurrency -----------------------------------------------------------------------------------
def test_concurrency_bound(server):
    server.delay(0.25)
    gen = _gen(server.url, concurrency=2)
    prompts = [Prompt([f"a photo of a cat {i}"]) for i in range(6)]
    out = gen._generate(prompts)
    assert len(out) == 6 and all(g.generated_tokens > 0 for g in out)
    assert server.max_in_flight == 2  # in parallel, and never more than asked


def test_concurrency_bound_across_threads(server):
    server.delay(0.2)
    gen = _gen(server.url, concurrency=3)
    results: list = []

    def work(k):
        results.append(gen._generate([Prompt([f"a dog {k} {i}"]) for i in range(3)]))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(results) == 3
    assert server.requests == 9
    assert server.max_in_flight <= 3


def test_hostile_answers_are_endpoint_errors_or_read_safely(tmp_path):
    """Answers a broken or hostile server may send (review of issue 20): deep JSON, bad usage counts,
    content in parts, a body over the cap: an EndpointError or a safe reading, never another exception."""
    import json as _json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from mmretrieve.errors import EndpointError
    from mmretrieve.rerank import endpoint as ep

    body = {"v": b""}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body["v"])))
            self.end_headers()
            try:
                self.wfile.write(body["v"])
            except OSError:
                pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        g = ep.EndpointGenerator(f"http://127.0.0.1:{srv.server_address[1]}/v1", "m", cache=False, retries=0)

        def ok(content, usage=None):
            return _json.dumps({"choices": [{"message": {"content": content}}], **({"usage": usage} if usage else {})}).encode()

        for raw, text, tokens in [(ok("A", {"prompt_tokens": "lots", "completion_tokens": -7}), "A", None),
                                  (b'{"choices":[{"message":{"content":"A"}}],"usage":{"prompt_tokens":1e999}}', "A", None),
                                  (ok([{"type": "text", "text": "B"}, {"type": "image_url"}], {"prompt_tokens": 9,
                                      "completion_tokens": 2}), "B", (9, 2)),
                                  (ok({"x": 1}), "", None)]:
            body["v"] = raw
            gen = g._generate([Prompt(["q"])])[0]
            assert gen.text == text and gen.prompt_tokens >= 0 and gen.generated_tokens >= 0
            if tokens:
                assert (gen.prompt_tokens, gen.generated_tokens) == tokens
        for raw, why in [(b"[" * 200_000 + b"]" * 200_000, "not JSON"), (b'{"choices": {"0": 1}}', "without choices"),
                         (ok("A" * (ep.MAX_BODY_BYTES + 10)), "more than")]:
            body["v"] = raw
            with pytest.raises(EndpointError, match=why):
                g._generate([Prompt(["q"])])
    finally:
        srv.shutdown()
