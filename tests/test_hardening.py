"""One bad request never fails another; oversized, malformed or endless input is turned away cleanly."""
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from samplers.modes import InvalidRequest, SamplingOptions
from tests.server_util import load_pipeline, serve, write_tiny_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    # 256 tokens per image, so that API requests are still decoding while the UI calls arrive
    return write_tiny_models(tmp_path_factory.mktemp("weights"), block_size=256)


@pytest.fixture(scope="module")
def live(models):
    server, engine = serve(load_pipeline(models), ui=True, max_rows=8, max_queue=32, header_timeout_s=1.0)
    with server:
        yield server, engine
    engine.close()


def _ui_call(url: str, data: list) -> str:
    """Gradio's HTTP API for the UI's generate button; returns "rejected" when the UI showed an input
    error in its heading, else the SSE event name."""
    with httpx.Client(timeout=60) as client:
        event_id = client.post(f"{url}/ui/gradio_api/call/generate",
                               json={"data": ["tiny", *data]}).json()["event_id"]
        text = client.get(f"{url}/ui/gradio_api/call/generate/{event_id}").text
    event = text.split("\n", 1)[0].removeprefix("event: ").strip()
    if event == "complete":
        heading = json.loads(text.split("data:", 1)[1].strip().splitlines()[0])[0]
        return "rejected" if heading.startswith("### ⚠") else event
    return event


def test_absurd_ui_calls_leave_concurrent_api_requests_answered(live):
    server, engine = live

    def api(i):
        with httpx.Client(timeout=60) as client:
            return client.get(f"{server.url}/generate", params={"class": i % 10, "mode": ["free", "cfg"][i % 2],
                                                                "seed": i}).status_code

    bad_ui = [["3", 10**30, 3.0, 2.0, 1.0, 0], ["3", 1, 3.0, 2.0, 1.0, 10**30], ["3", -5, 3.0, 2.0, 1.0, 0],
              ["3", 1, 1e30, 2.0, 1.0, 0], ["3", 1, 3.0, 2.0, 1.0, -1], ["3", 1, 3.0, 1e30, 1.0, 0]]
    with ThreadPoolExecutor(16) as pool:
        api_futures = [pool.submit(api, i) for i in range(8)]
        time.sleep(0.05)
        ui_futures = [pool.submit(_ui_call, server.url, data) for data in bad_ui]
        statuses = [f.result() for f in api_futures]
        events = [f.result() for f in ui_futures]
    assert statuses == [200] * 8
    # the absurd seed and top-k pass Gradio's own checks and are refused by the engine's; the rest
    # Gradio itself refuses (its sliders' and numbers' ranges)
    assert events[:2] == ["rejected", "rejected"] and set(events) <= {"rejected", "error"}
    assert _ui_call(server.url, ["3", 1, 3.0, 2.0, 1.0, 0]) == "complete"  # the UI itself still works
    assert engine.queue_length() == 0 and sum(engine.rows_in_use().values()) == 0


def test_engine_checks_at_submit_with_the_api_rules(live):
    _, engine = live
    for seed in (10**30, -1, True, 1.5):
        with pytest.raises(InvalidRequest) as err:
            engine.submit(1, "free", seed, SamplingOptions())
        assert err.value.field == "seed"
    with pytest.raises(InvalidRequest) as err:
        engine.submit(10, "free", 0, SamplingOptions())
    assert err.value.field == "class"
    for kwargs, field in (({"top_k": 10**30}, "top_k"), ({"cfg_scale": float("inf")}, "cfg_scale"),
                          ({"temperature": float("nan")}, "temperature"), ({"cfg_interval": 10**30}, "cfg_interval")):
        with pytest.raises(InvalidRequest) as err:
            SamplingOptions(**kwargs)
        assert err.value.field == field


def test_a_failure_inside_the_loop_fails_that_request_alone(live, monkeypatch):
    """Whatever slips past the checks and breaks at admission answers its own request only; every
    other request, running or queued, gets its image."""
    _, engine = live
    decoder = engine.decoders["base"]
    original = decoder.add

    def add(class_id, seed, options, tag=None):
        if seed == 666:
            raise RuntimeError("boom")
        return original(class_id, seed, options, tag)

    monkeypatch.setattr(decoder, "add", add)
    opts = SamplingOptions(cfg_scale=2.0)
    reqs = [engine.submit(i % 10, "cfg", 666 if i == 3 else i, opts) for i in range(12)]  # more than fit at once
    outcomes = []
    for req in reqs:
        try:
            outcomes.append(req.future.result(timeout=60).seed)
        except RuntimeError as e:
            outcomes.append(str(e))
    assert outcomes[3] == "admission failed"
    assert [o for i, o in enumerate(outcomes) if i != 3] == [i for i in range(12) if i != 3]


def test_body_size_error_count_and_echo_are_capped(live):
    server, _ = live
    r = httpx.post(f"{server.url}/generate", content=b"x" * 200_000, headers={"content-type": "application/json"})
    assert r.status_code == 413

    def chunks():
        for _ in range(100):
            yield b" " * 1000  # streamed, no Content-Length

    r = httpx.post(f"{server.url}/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    many = json.dumps({f"k{i}": 1 for i in range(3000)})  # under the size limit, thousands of bad keys
    r = httpx.post(f"{server.url}/generate", content=many, headers={"content-type": "application/json"})
    assert r.status_code == 422 and len(r.content) < 5000 and "more errors not shown" in r.text
    r = httpx.post(f"{server.url}/generate", json={"mode": "m" * 30_000})
    assert r.status_code == 422 and len(r.content) < 2000
    r = httpx.get(f"{server.url}/generate", params={"model": "x" * 100})
    assert r.status_code == 422 and len(r.content) < 2000
    r = httpx.post(f"{server.url}/ui/gradio_api/upload", files={"files": ("a.txt", b"x" * 100)})
    assert r.status_code == 403


def test_impossible_request_is_4xx_not_retry(models):
    server, engine = serve(load_pipeline(models), max_rows=8, max_queue=4)
    with server:
        r = httpx.get(f"{server.url}/generate", params={"class": 1, "n": 8, "mode": "free"}, timeout=30)
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == "n" and "Retry-After" not in r.headers
    engine.close()


def test_idle_and_half_sent_connections_are_closed(live):
    server, _ = live
    host, port = server.url.removeprefix("http://").split(":")
    for payload in (b"", b"GET /health HTTP/1.1\r\nHost: x\r\n"):  # nothing; headers never finished
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(payload)
            start = time.monotonic()
            assert sock.recv(1024) == b""  # closed by the server, no answer
            assert time.monotonic() - start < 8
    r = httpx.get(f"{server.url}/health")  # and the server is fine
    assert r.status_code == 200


@pytest.mark.parametrize("method,path,kwargs,field", [
    ("get", "/compare", {"params": {"bogus": 1}}, "bogus"),
    ("get", "/generate", {"params": {"mode": ""}}, "mode"),
    ("get", "/generate", {"params": {"model": ""}}, "model"),
    ("post", "/generate", {"json": {"class": True}}, "class"),
    ("get", "/generate", {"params": {"cfg_scale": "nan"}}, "cfg_scale"),
    ("post", "/generate", {"content": b"not json", "headers": {"content-type": "application/json"}}, "body"),
])
def test_small_input_mistakes_are_named(live, method, path, kwargs, field):
    server, _ = live
    r = getattr(httpx, method)(f"{server.url}{path}", **kwargs)
    assert r.status_code == 422
    detail = r.json()["detail"][0]
    assert detail["field"] == field
    if field == "cfg_scale":
        assert "finite" in detail["message"]


def test_stats_count_requests_not_images(models):
    server, engine = serve(load_pipeline(models), max_rows=8, max_queue=32)
    with server:
        assert httpx.get(f"{server.url}/generate", params={"class": 1, "n": 4, "mode": "cca"}, timeout=60).status_code \
            == 200
        cca = httpx.get(f"{server.url}/stats").json()["modes"]["cca"]
        assert cca["requests"] == 1 and cca["images"] == 4
    engine.close()


def test_mounted_ui_does_not_spin_when_idle(live):
    """Gradio's queue polls every 1 ms by default on Linux (8% of a core, idle); ours waits 50 ms."""
    from ui.app import IDLE_POLL_S, mount_ui

    server, engine = live
    from fastapi import FastAPI

    app = FastAPI()
    mount_ui(app, engine)
    demo = next(r.app for r in app.routes if getattr(r, "path", None) == "/ui").blocks
    assert demo._queue.sleep_when_free == IDLE_POLL_S >= 0.05
