"""The HTTP API and batching engine against a real uvicorn server on 127.0.0.1."""
import base64
import io
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from samplers.modes import SamplingOptions
from server.engine import Engine
from tests.server_util import load_pipeline, serve, write_tiny_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def reference(models):
    """A second copy of the same weights, never touched by the server: the seed-alone images."""
    return load_pipeline(models)


@pytest.fixture(scope="module")
def live(models):
    server, engine = serve(load_pipeline(models), max_rows=8, max_queue=64)
    with server:
        yield server, engine
    engine.close()


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _alone(reference, class_id, mode, seed, **opts) -> np.ndarray:
    return np.asarray(reference([class_id], mode, [seed], **opts)[0].image)


def test_concurrent_mixed_modes_match_seed_alone(live, reference, monkeypatch):
    """Seeded images served under concurrency, modes mixed, equal the same request made alone, to
    the pixel: tokens do not depend on the batch, and each image's codes are decoded on their own
    (a decoder's arithmetic may depend on its batch size)."""
    server, engine = live
    family = engine.pipeline.family
    decoded_batch_sizes = []
    original = family.codes_to_images

    def spy(codes):
        decoded_batch_sizes.append(len(codes))
        return original(codes)

    monkeypatch.setattr(family, "codes_to_images", spy)
    pairs = [(c, m) for c in range(3) for m in ("free", "cfg", "cca", "cca+cfg")]
    cases = [(c, m, s) for s, (c, m) in enumerate(pairs)]
    cases += [(5, "cfg", 100), (5, "cca", 100), (9, "free", 7), (9, "cca+cfg", 7)] * 2  # duplicates too

    def get(case):
        c, m, s = case
        with httpx.Client(timeout=60) as client:
            r = client.get(f"{server.url}/generate", params={"class": c, "mode": m, "seed": s, "top_k": 20})
        return case, r

    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(get, cases))
    for (c, m, s), r in results:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"] == "image/png" and r.headers["x-seed"] == str(s)
        assert np.array_equal(_pixels(r.content), _alone(reference, c, m, s, top_k=20)), (c, m, s)
    # they really were batched together: more than one image per step on average
    occ = engine.stats.snapshot()["batch_occupancy"]
    assert max(v["mean_rows_per_step"] for v in occ.values()) > 1.5
    assert set(occ) == {"base", "cca", "cca_cfg"}  # cca+cfg runs on its own fine-tune's decoder
    assert decoded_batch_sizes and set(decoded_batch_sizes) == {1}


def test_post_generate_json_and_grid(live, reference):
    server, _ = live
    r = httpx.post(f"{server.url}/generate", json={"class": 4, "mode": "cca+cfg", "seed": 11, "n": 3,
                                                   "cfg_scale": 2.0}, timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "cca+cfg" and len(body["images"]) == 3
    for i, img in enumerate(body["images"]):
        assert img["seed"] == 11 + i and img["class_name"] == "thing 4" and img["cfg_scale"] == 2.0
        assert img["rows_x_steps"] == 2 * 16 and img["latency_s"] >= img["queue_wait_s"] >= 0
        png = base64.b64decode(img["png_base64"])
        assert np.array_equal(_pixels(png), _alone(reference, 4, "cca+cfg", 11 + i, cfg_scale=2.0))
    grid = httpx.get(f"{server.url}/generate", params={"class": 4, "seed": 11, "n": 3}, timeout=60)
    assert grid.status_code == 200 and grid.headers["x-seed"] == "11,12,13"
    assert Image.open(io.BytesIO(grid.content)).size == (3 * 8, 8)


def test_default_mode_and_random_seed_echoed(live, reference):
    server, _ = live
    r = httpx.get(f"{server.url}/generate", params={"class": 2}, timeout=60)
    assert r.status_code == 200 and r.headers["x-mode"] == "cca"
    seed = int(r.headers["x-seed"])
    assert np.array_equal(_pixels(r.content), _alone(reference, 2, "cca", seed))


@pytest.mark.parametrize("alias", ["cca_cfg", "cca cfg", "cca+cfg", "CCA+CFG"])
def test_mode_aliases(live, alias):
    server, _ = live
    r = httpx.get(f"{server.url}/generate", params={"class": 1, "mode": alias, "seed": 3}, timeout=60)
    assert r.status_code == 200 and r.headers["x-mode"] == "cca+cfg"
    # an unencoded '+' in a hand-written URL arrives as a space
    r = httpx.get(f"{server.url}/generate?class=1&mode=cca+cfg&seed=3", timeout=60)
    assert r.status_code == 200 and r.headers["x-mode"] == "cca+cfg"


@pytest.mark.parametrize("params, field", [
    ({"class": 10}, "class"),
    ({"class": -1}, "class"),
    ({"class": "cat"}, "class"),
    ({"class": 1, "mode": "dpo"}, "mode"),
    ({"class": 1, "top_p": 0}, "top_p"),
    ({"class": 1, "temperature": 11}, "temperature"),
    ({"class": 1, "n": 17}, "n"),
    ({"class": 1, "seed": -5}, "seed"),
    ({"class": 1, "cfg_scale": 99}, "cfg_scale"),
    ({"class": 1, "model": "../../etc/passwd"}, "model"),
    ({"class": 1, "colour": "red"}, "colour"),
])
def test_bad_input_is_422_naming_the_field(live, params, field):
    server, _ = live
    r = httpx.get(f"{server.url}/generate", params=params, timeout=30)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert any(d["field"] == field for d in detail), detail
    assert "Traceback" not in r.text


def test_post_bad_input(live):
    server, _ = live
    r = httpx.post(f"{server.url}/generate", json={"class": 3, "mode": "cca", "top_k": -1}, timeout=30)
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "top_k"
    r = httpx.post(f"{server.url}/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_compare_png_and_json(live, reference):
    server, _ = live
    r = httpx.get(f"{server.url}/compare", params={"class": 6, "seed": 0, "format": "json"}, timeout=60)
    assert r.status_code == 200
    images = r.json()["images"]
    assert [i["mode"] for i in images] == ["free", "cfg", "cca", "cca+cfg"]
    assert [i["rows_x_steps"] for i in images] == [16, 32, 16, 32]
    for i in images:
        assert np.array_equal(_pixels(base64.b64decode(i["png_base64"])), _alone(reference, 6, i["mode"], 0))
    r = httpx.get(f"{server.url}/compare", params={"class": 6, "seed": 0}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"


def test_models_health_metrics(live):
    server, _ = live
    models = httpx.get(f"{server.url}/models").json()
    assert models[0]["name"] == "tiny" and models[0]["modes"] == ["free", "cfg", "cca", "cca+cfg"]
    assert models[0]["class_names"][3] == "thing 3" and models[0]["num_classes"] == 10
    assert models[0]["default_cfg_scale"] == models[0]["default_cca_cfg_scale"] == 3.0  # none named: the same
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'ccaserve_images_total{mode="cca"}' in metrics and "# TYPE ccaserve_requests_total counter" in metrics
    openapi = httpx.get(f"{server.url}/openapi.json").json()
    params = {p["name"]: p for p in openapi["paths"]["/generate"]["get"]["parameters"]}
    assert params["top_p"]["schema"]["maximum"] == 1.0 and params["n"]["schema"]["maximum"] == 16
    assert "description" in params["cfg_scale"]


def test_stats_match_what_was_sent(models):
    server, engine = serve(load_pipeline(models), max_rows=8)
    with server, httpx.Client(timeout=60) as client:
        sent = {"free": 3, "cfg": 2, "cca": 4, "cca+cfg": 1}
        for mode, k in sent.items():
            for i in range(k):
                r = client.get(f"{server.url}/generate", params={"class": i, "mode": mode, "seed": i})
                assert r.status_code == 200
        client.get(f"{server.url}/generate", params={"class": 99})  # a 422
        stats = client.get(f"{server.url}/stats").json()
    engine.close()
    for mode, k in sent.items():
        b = stats["modes"][mode]
        assert b["requests"] == k and b["images"] == k and b["tokens"] == 16 * k
        assert b["rows_x_steps_per_image"] == (32 if mode in ("cfg", "cca+cfg") else 16)
        assert b["latency_s"]["p50"] > 0 and b["images_per_s_since_start"] > 0
    assert stats["overall"]["images"] == sum(sent.values())
    assert stats["errors"] == {"422": 1}
    assert stats["queue"]["length"] == 0 and stats["rows_in_use"] == {"base": 0, "cca": 0, "cca_cfg": 0}
    assert stats["system"]["device"] == "cpu"


def test_full_queue_gives_503_with_retry_after(models):
    # one guided image fits at a time, two wait: of 8 simultaneous requests some must be turned away
    server, engine = serve(load_pipeline(models), max_rows=2, max_queue=2)
    with server:
        def get(i):
            with httpx.Client(timeout=60) as client:
                return client.get(f"{server.url}/generate", params={"class": 1, "mode": "cfg", "seed": i})
        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(get, range(8)))
    engine.close()
    codes = sorted(r.status_code for r in responses)
    assert 503 in codes and 200 in codes and set(codes) <= {200, 503}
    for r in responses:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and "queue is full" in r.json()["detail"]


def test_disconnect_frees_rows(tmp_path):
    # a longer image (32x32 tokens) so the client can give up while it is being decoded
    pipe = load_pipeline(write_tiny_models(tmp_path, block_size=1024))
    server, engine = serve(pipe, max_rows=32)
    with server:
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(f"{server.url}/generate", params={"class": 1, "mode": "cfg", "seed": 0, "n": 16}, timeout=0.5)
        deadline = time.time() + 10
        while engine.rows_in_use()["base"] and time.time() < deadline:
            time.sleep(0.05)
        assert engine.rows_in_use() == {"base": 0, "cca": 0, "cca_cfg": 0}
        stats = httpx.get(f"{server.url}/stats").json()
    engine.close()
    assert stats["modes"]["cfg"]["requests"] == 1 and stats["modes"]["cfg"]["images"] == 0  # one request of 16
    assert stats["errors"].get("client_closed") == 1


def test_engine_in_process_matches_and_cancels(models, reference):
    engine = Engine(load_pipeline(models), max_rows=4)
    opts = SamplingOptions(cfg_scale=3.0)
    r = engine.generate(3, "cfg", 5, opts, timeout=30)
    assert np.array_equal(np.asarray(r.image), _alone(reference, 3, "cfg", 5))
    with pytest.raises(ValueError):
        engine.submit(10, "cfg", 0, opts)
    engine.close()


def test_load_generator_is_bounded_and_counts(live):
    from benchmarks.loadgen import load

    server, engine = live
    before = engine.stats.snapshot()["overall"]["images"]
    res = load(server.url, concurrency=4, duration_s=1.0, modes=["free", "cca+cfg"], classes=[1, 2]).summary()
    assert res["wall_s"] < 30 and set(res["statuses"]) == {"200"}
    assert res["images"] == res["statuses"]["200"] == sum(m["images"] for m in res["modes"].values())
    assert engine.stats.snapshot()["overall"]["images"] - before == res["images"]


def test_vq_decode_overlaps_the_next_steps(models, monkeypatch):
    """Finished images are decoded on the finisher thread: the engine keeps stepping meanwhile."""
    import threading

    engine = Engine(load_pipeline(models), max_rows=4)
    family = engine.pipeline.family
    original = family.codes_to_images
    decoding, release, seen = threading.Event(), threading.Event(), {}

    def slow(codes):
        if "first" not in seen:
            seen["first"] = threading.current_thread().name
            decoding.set()
            release.wait(timeout=30)
        return original(codes)

    monkeypatch.setattr(family, "codes_to_images", slow)
    first = engine.submit(1, "free", 0, SamplingOptions())
    assert decoding.wait(timeout=30)
    steps_before = engine.decoders["base"].steps
    second = engine.submit(2, "free", 1, SamplingOptions())
    deadline = time.time() + 30
    while engine.decoders["base"].steps < steps_before + 16 and time.time() < deadline:
        time.sleep(0.01)
    assert engine.decoders["base"].steps >= steps_before + 16  # the second image was decoded token by token
    assert not first.future.done()  # while the first one's VQ decode was still held
    release.set()
    assert first.future.result(timeout=30).seed == 0 and second.future.result(timeout=30).seed == 1
    assert seen["first"].startswith("finish-")
    engine.close()
