"""A real `mmretrieve serve` on loopback, attacked (issue 17, items 1, 2, 4, 5): idle and slow clients, deep
JSON, lone surrogates, Host names, what /healthz and error messages tell a stranger, the token cookie.
Every loop here is bounded in count and time; every socket goes to 127.0.0.x only."""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx", reason="the service tests need httpx (the dev extra)")

from tests.serve_helpers import free_port  # noqa: E402

TOKEN = "attack-test-token-of-24-chars"
HEADER_TIMEOUT = 2.0


def _import(home, name: str, encoder: str) -> None:
    from mmretrieve.cli import main

    vec = home.parent / f"{name}.npy"
    rng = np.random.default_rng(1)
    np.save(vec, rng.standard_normal((30, 16)).astype(np.float32))
    keys = home.parent / f"{name}.txt"
    keys.write_text("".join(f"k{i}\n" for i in range(30)))
    assert main(["index", "import", name, str(vec), "--keys", str(keys), "--encoder", encoder, "--normalize",
                 "--index-dir", str(home), "-q"]) == 0


@contextlib.contextmanager
def serving(home, *args: str, host: str = "127.0.0.1"):
    """``mmretrieve serve`` in a process of its own; yields its base URL; stopped (and waited for) after."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "mmretrieve", "serve", *args, "--index-dir", str(home), "--host", host,
                          "--port", str(port), "--header-timeout", str(HEADER_TIMEOUT), "--reload-interval", "0"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://{host}:{port}"
    try:
        t0 = time.monotonic()
        while True:
            assert p.poll() is None, p.stdout.read()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            assert time.monotonic() - t0 < 60, "the server did not start"
            time.sleep(0.2)
        yield base
    finally:
        p.terminate()
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout=5)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("attacks") / "indexes"
    _import(home, "mine", "my-model")
    _import(home, "hub", "open_clip:ViT-B-32@laion2b_s34b_b79k")  # an encoder that cannot load offline
    return home


@pytest.fixture(scope="module")
def server(home):
    with serving(home, "mine", "hub", "--token", TOKEN) as base:
        yield base


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _search(base: str, **body):
    return httpx.post(f"{base}/api/v1/indexes/mine/search", json={"item_key": "k3", "k": 3, **body}, headers=AUTH, timeout=10)


def _raise_fd_limit(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(n, hard), hard))


def test_idle_and_slow_clients_cannot_block_an_authorised_search(server):
    """400 idle sockets (not one byte sent), 30 slow-header clients and 10 slow-body clients with the token
    and 30 without it: an authorised search still answers in under 1 s; the server closes the idle
    sockets after its header deadline and answers the slow bodies 408 (those without a token 401 at once)."""
    _raise_fd_limit(2048)
    host, port = server.rsplit("/", 1)[1].split(":")
    addr = (host, int(port))
    idle = [socket.create_connection(addr, timeout=5) for _ in range(400)]
    slow_headers = []
    for _ in range(30):
        s = socket.create_connection(addr, timeout=5)
        s.sendall(b"POST /api/v1/indexes/mine/search HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
        slow_headers.append(s)

    def slow_body(token: bool) -> socket.socket:
        s = socket.create_connection(addr, timeout=10)
        auth = f"Authorization: Bearer {TOKEN}\r\n" if token else ""
        s.sendall(f"POST /api/v1/indexes/mine/search HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json"
                  "\r\nContent-Length: 1000\r\n\r\n{".encode())
        return s

    slow_authed = [slow_body(True) for _ in range(10)]
    slow_anon = [slow_body(False) for _ in range(30)]
    try:
        for _ in range(3):
            t0 = time.monotonic()
            r = _search(server)
            assert r.status_code == 200, r.text
            assert time.monotonic() - t0 < 1.0, time.monotonic() - t0
        for s in slow_anon:  # refused from their headers: no body read, no slot held
            assert s.recv(4096).startswith(b"HTTP/1.1 401")
        deadline = time.monotonic() + HEADER_TIMEOUT + 8
        for s in slow_authed:  # one byte a second at most: 408 once the grace (5 s) is over
            got = b""
            while not got and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError, socket.timeout):
                    s.settimeout(0.5)
                    s.sendall(b" ")
                    got = s.recv(4096)
            assert got.startswith(b"HTTP/1.1 408"), got[:200]
        for s in idle + slow_headers:  # closed by the server: end of stream, nothing else
            s.settimeout(max(deadline - time.monotonic(), 0.5))
            assert s.recv(1) == b""
        t0 = time.monotonic()
        assert _search(server).status_code == 200 and time.monotonic() - t0 < 1.0
    finally:
        for s in idle + slow_headers + slow_authed + slow_anon:
            s.close()


DEEP = 100_000


@pytest.mark.parametrize("body", [
    '{"text": ' + "[" * DEEP + "]" * DEEP + "}",
    '{"item_key": "k1", "fusion_options": ' + '{"a": ' * 5000 + "1" + "}" * 5000 + "}",
    '{"vector": ' + "[" * DEEP + "]" * DEEP + "}",
    '{"text": "\\ud800"}',
    '{"item_key": "k1", "text": "a \\udfff b"}',
], ids=["deep-text", "deep-fusion-options", "deep-vector", "lone-surrogate", "lone-low-surrogate"])
def test_hostile_json_is_a_4xx_with_the_reason(server, body):
    r = httpx.post(f"{server}/api/v1/indexes/mine/search", content=body.encode(),
                   headers={**AUTH, "Content-Type": "application/json"}, timeout=10)
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    msg = r.json()["error"]["message"]
    assert "nested more than" in msg or "surrogate" in msg


@pytest.mark.parametrize("field,value", [("vector", "[" * 50_000 + "]" * 50_000),  # a form field holds 256 KB
                                         ("fusion_options", '{"a": ' * 5000 + "1" + "}" * 5000)])
def test_hostile_json_through_multipart_is_a_4xx(server, field, value):
    parts = b"".join(b'--B\r\nContent-Disposition: form-data; name="%s"\r\n\r\n%s\r\n' % (k.encode(), v.encode())
                     for k, v in (("item_key", "k1"), (field, value))) + b"--B--\r\n"
    r = httpx.post(f"{server}/api/v1/indexes/mine/search", content=parts, timeout=10,
                   headers={**AUTH, "Content-Type": "multipart/form-data; boundary=B"})
    assert r.status_code == 400 and "nested more than" in r.json()["error"]["message"], r.text[:300]


def test_healthz_tells_a_stranger_only_that_it_is_alive(server):
    assert httpx.get(f"{server}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server}/healthz", headers=AUTH).json()["indexes"].keys() == {"mine", "hub"}


def test_error_messages_show_no_server_paths(server, home):
    r = httpx.post(f"{server}/api/v1/indexes/hub/search", json={"text": "a cat"}, headers=AUTH, timeout=30)
    assert r.status_code == 400
    msg = r.json()["error"]["message"]
    assert "cannot be loaded" in msg and "local cache" in msg  # the reason is kept ...
    assert os.path.expanduser("~") + "/" not in msg and str(home) not in msg and "/tmp/" not in msg  # ... its paths are not


def test_the_token_cookie_is_set_by_the_server_and_script_cannot_read_it(server):
    assert httpx.post(f"{server}/session", json={"token": "wrong"}).status_code == 401
    r = httpx.post(f"{server}/session", json={"token": TOKEN})
    assert r.status_code == 204
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict") and "Path=/" in cookie
    with httpx.Client(base_url=server, cookies=r.cookies) as c:
        assert c.post("/api/v1/indexes/mine/search", json={"item_key": "k2", "k": 2}).status_code == 200
        assert "indexes" in c.get("/healthz").json()
    assert httpx.post(f"{server}/api/v1/indexes/mine/search", json={"item_key": "k2"}).status_code == 401


def test_a_server_bound_to_another_loopback_address_answers(home):
    """--host 127.0.0.2 (no token: a loopback bind) used to start and then refuse every request."""
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.2", 0))
    except OSError:
        pytest.skip("127.0.0.2 cannot be bound on this machine")
    with serving(home, "mine", host="127.0.0.2") as base:
        r = httpx.post(f"{base}/api/v1/indexes/mine/search", json={"item_key": "k1", "k": 2}, timeout=10)
        assert r.status_code == 200, r.text
        other = httpx.get(f"{base}/healthz", headers={"Host": "evil.example"})
        assert other.status_code == 400  # DNS rebinding is still refused
        assert other.text == "Invalid host header"  # Starlette's TrustedHostMiddleware
