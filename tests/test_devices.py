"""One server over several engines (devices): replicas of a model behind the same API, requests
going where rows are free, /stats per device. Tested with two CPU engines."""
from concurrent.futures import ThreadPoolExecutor

import httpx

from samplers import Pipeline
from server.app import ModelServer, create_app
from server.engine import Engine
from server.pool import EnginePool
from tests.server_util import LiveServer


def test_two_replicas_share_the_work_and_answer_like_one():
    pipes = [Pipeline.from_registry("tiny-random") for _ in range(2)]
    first = Engine(pipes[0], max_rows=4, max_queue=32)
    pool = EnginePool([first, Engine(pipes[1], max_rows=4, max_queue=32, stats=first.stats)])
    single = Pipeline.from_registry("tiny-random")
    with LiveServer(create_app(ModelServer({"tiny-random": pool}))) as server:
        def get(i):
            with httpx.Client(timeout=120) as client:
                return i, client.get(f"{server.url}/generate", params={"class": i, "mode": ["free", "cfg"][i % 2],
                                                                       "seed": i})
        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(get, range(12)))
        stats = httpx.get(f"{server.url}/stats").json()
    for i, r in results:
        assert r.status_code == 200
        assert r.headers["x-rows-x-steps"] == str(single([i], ["free", "cfg"][i % 2], [i])[0].rows_x_steps)
    devices = stats["devices"]
    assert len(devices) == 2 and all(d["device"] == "cpu" for d in devices)
    assert sum(d["images"] for d in devices) == 12 and all(d["images"] > 0 for d in devices)  # both worked
    assert stats["overall"]["images"] == 12  # one set of statistics for the model
    pool.close()


def test_cli_serve_builds_one_engine_per_device(monkeypatch):
    captured = {}

    class FakeServer:
        def __init__(self, config):
            captured["app"] = config.app

        def run(self):
            captured["server"] = captured["app"].state.server

    monkeypatch.setattr("uvicorn.Server", FakeServer)
    from cli import build_parser

    ns = build_parser().parse_args(["serve", "--model", "tiny-random", "--devices", "cpu,cpu", "--no-ui"])
    ns.argv = []
    assert ns.func(ns) == 0
    engine = captured["server"].engines["tiny-random"]
    assert isinstance(engine, EnginePool) and len(engine.engines) == 2


def test_metrics_expose_the_signals_to_scale_on():
    engine = Engine(Pipeline.from_registry("tiny-random"), max_rows=4)
    with LiveServer(create_app(ModelServer({"tiny-random": engine}))) as server:
        text = httpx.get(f"{server.url}/metrics").text
    engine.close()
    assert 'ccaserve_queue_length{model="tiny-random"} 0' in text
    assert 'ccaserve_rows_busy_fraction{model="tiny-random",device="cpu",replica="0"} 0.0000' in text
