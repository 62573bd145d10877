"""A VAR model everywhere a model can be used: pipeline, CLI, engine, HTTP server beside a LlamaGen
model, and the UI's model picker."""
import io
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from cli import main as cli_main
from samplers import Pipeline
from server.app import ModelServer, create_app
from server.engine import Engine
from tests.server_util import LiveServer


@pytest.fixture(scope="module")
def var_pipe():
    return Pipeline.from_registry("tiny-var-random")


@pytest.fixture(scope="module")
def reference():
    return Pipeline.from_registry("tiny-var-random")  # a second copy, never touched by the server


@pytest.fixture(scope="module")
def live(var_pipe):
    engines = {"tiny-var-random": Engine(var_pipe, max_rows=8, max_queue=64),
               "tiny-random": Engine(Pipeline.from_registry("tiny-random"), max_rows=8, max_queue=64)}
    app = create_app(ModelServer(engines, default="tiny-random"))
    from ui.app import mount_ui

    mount_ui(app, engines)
    with LiveServer(app) as server:
        yield server, engines
    for e in engines.values():
        e.close()


def test_pipeline_runs_the_four_modes(var_pipe):
    assert var_pipe.family.name == "var" and var_pipe.modes == ["free", "cfg", "cca", "cca+cfg"]
    results = var_pipe.compare(207, seed=3)
    assert {m: r.rows for m, r in results.items()} == {"free": 1, "cfg": 2, "cca": 1, "cca+cfg": 2}
    assert all(r.image.size == (64, 64) and len(r.tokens) == 85 for r in results.values())
    assert results["free"].rows_x_steps == 4 and results["cfg"].rows_x_steps == 8  # 4 scales, 1 or 2 rows


def test_cli_samples_a_var_model_with_vars_own_flags(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert cli_main(["sample", "--model", "tiny-var-random", "--class", "golden retriever", "--cfg", "1.5",
                     "--top_k", "50", "--top_p", "0", "--more_smooth", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "cfg " in printed and "2.5" in printed  # VAR's cfg 1.5 is cfg_scale 2.5
    assert Image.open(out).width > 4 * 64


def test_models_lists_families_and_conventions(live):
    server, _ = live
    models = {m["name"]: m for m in httpx.get(f"{server.url}/models").json()}
    var, gpt = models["tiny-var-random"], models["tiny-random"]
    assert (var["family"], var["image_size"], var["tokens"], var["steps"]) == ("var", 64, 85, 4)
    assert gpt["family"] == "llamagen" and gpt["steps"] == gpt["tokens"]
    assert "ramped" in var["guidance"] and var["class_names"][207] == "golden retriever"


def test_concurrent_var_requests_mixed_modes_match_alone(live, reference):
    server, engines = live

    def get(case):
        c, m, s = case
        with httpx.Client(timeout=120) as client:
            r = client.get(f"{server.url}/generate", params={"model": "tiny-var-random", "class": c, "mode": m,
                                                             "seed": s, "top_k": 40})
        return case, r

    cases = [(c, m, s) for s, (c, m) in enumerate((c, m) for c in (1, 207) for m in ("free", "cfg", "cca", "cca+cfg"))]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(get, cases))
    for (c, m, s), r in results:
        assert r.status_code == 200, r.text
        got = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB"))
        alone = np.asarray(reference([c], m, [s], top_k=40)[0].image)
        assert np.array_equal(got, alone), (c, m, s)
    occupancy = engines["tiny-var-random"].stats.snapshot()["batch_occupancy"]
    assert max(v["mean_rows_per_step"] for v in occupancy.values()) > 1.0  # they shared steps


def test_var_options_are_checked(live):
    server, _ = live
    r = httpx.get(f"{server.url}/generate", params={"model": "tiny-var-random", "cfg_interval": 3, "mode": "cfg"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "cfg_interval"
    r = httpx.get(f"{server.url}/generate", params={"model": "tiny-random", "more_smooth": "true"})
    assert r.status_code == 422 and r.json()["detail"][0]["field"] == "more_smooth"
    r = httpx.get(f"{server.url}/compare", params={"model": "tiny-var-random", "class": 5, "format": "json",
                                                   "cfg_schedule": "constant"})
    assert r.status_code == 200 and len(r.json()["images"]) == 4


def test_sample_fid_writes_a_var_evaluation_set(tmp_path):
    import numpy as np

    out = tmp_path / "s"
    assert cli_main(["sample-fid", "--model", "tiny-var-random", "--mode", "cfg", "--num-images", "6",
                     "--per-proc-batch-size", "4", "--out", str(out), "--quiet"]) == 0
    assert len(list(out.glob("*.png"))) == 6
    with np.load(f"{out}.npz") as data:
        assert data["arr_0"].shape == (6, 64, 64, 3)


def test_var_runs_in_bf16():
    """The dtype path CUDA uses (bf16 weights and cache, fp32 logits and VAE), exercised on CPU."""
    import torch

    pipe = Pipeline.from_registry("tiny-var-random", dtype=torch.bfloat16)
    result = pipe([207], "cfg", [1], top_k=40)[0]
    assert len(result.tokens) == 85 and result.image.size == (64, 64)
