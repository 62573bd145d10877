"""`ccaserve bench`: schema and internal consistency of its numbers, on tiny models."""
import json

import pytest
import torch

from benchmarks import offline as bench
from cli import main
from tests.server_util import load_pipeline, serve, write_tiny_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("weights"))


def test_offline_report_is_consistent(models):
    pipe = load_pipeline(models)
    peaks = bench.measure_peaks(pipe.gpt.device, seconds=0.05)
    assert peaks["gemm_gflops"] > 0 and peaks["mem_gbps"] > 0
    report = bench.run_offline(pipe, ["free", "cfg", "cca", "cca+cfg"], [1, 3], repeats=2, peaks=peaks,
                               usd_per_hour=2.0, progress=False)
    cells = {(c["mode"], c["batch"]): c for c in report["cells"]}
    assert len(cells) == 8
    tokens = pipe.gpt.config.block_size
    for (mode, batch), c in cells.items():
        guided = mode in ("cfg", "cca+cfg")
        assert c["rows_x_steps_per_image"] == (2 if guided else 1) * tokens
        lat = c["latency_s"]
        assert lat["min"] <= lat["median"] <= lat["max"]
        assert c["images_per_s"] == pytest.approx(batch / lat["median"], rel=1e-2)
        assert c["tokens_per_s"] == pytest.approx(batch * tokens / c["gpt_s_median"], rel=1e-2)
        assert c["latency_s"]["median"] >= c["gpt_s_median"]
        assert 0 < c["gemm_fraction_of_peak"] and 0 < c["bandwidth_fraction_of_peak"]
        assert c["usd_per_1000_images"] == pytest.approx(2.0 * 1000 / c["images_per_s"] / 3600, rel=1e-3)
    # guided cells do twice the arithmetic of unguided ones with the same batch
    assert cells[("cfg", 3)]["gflop_per_batch"] == pytest.approx(2 * cells[("free", 3)]["gflop_per_batch"], rel=1e-6)
    assert [r["rows_x_steps_ratio"] for r in report["cfg_over_cca"]] == [2.0, 2.0]
    assert "| cfg | 3 |" in bench.markdown(report)


def test_decode_work_counts_weights_and_cache(models):
    gpt = load_pipeline(models).gpt
    p = bench.matmul_params(gpt)
    flops, bytes_ = bench.decode_work(gpt, [1])  # one row, one step, context 1
    c = gpt.config
    assert flops == 2 * p + 4 * c.n_layer * c.dim
    assert bytes_ == 4 * p + 2 * c.n_layer * c.kv_heads * c.head_dim * 4


def test_bench_cli_offline_writes_json_markdown_plots(models, tmp_path):
    args = ["bench", "--gpt-ckpt", str(models["gpt"]), "--cca-ckpt", str(models["cca"]), "--vq-ckpt",
            str(models["vq"]), "--batch-sizes", "1,2", "--repeats", "2", "--no-peaks", "--quiet",
            "--json", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md"), "--plot", str(tmp_path / "b")]
    assert main(args) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    assert {c["mode"] for c in report["cells"]} == {"free", "cfg", "cca", "cca+cfg"}
    assert report["command"].startswith("ccaserve bench")
    assert (tmp_path / "b_throughput.png").stat().st_size > 1000 and (tmp_path / "b_cost_ratio.png").exists()
    assert "cfg/cca" in (tmp_path / "b.md").read_text()


def test_bench_cli_online_against_a_server(models, tmp_path):
    server, engine = serve(load_pipeline(models), max_rows=8)
    with server:
        assert main(["bench", "--url", server.url, "--concurrency", "1,3", "--duration", "0.5", "--modes",
                     "cfg,cca", "--json", str(tmp_path / "o.json")]) == 0
        served = engine.stats.snapshot()["overall"]["images"]
    engine.close()
    report = json.loads((tmp_path / "o.json").read_text())
    assert [r["concurrency"] for r in report["runs"]] == [1, 3]
    assert sum(r["images"] for r in report["runs"]) == served
    for r in report["runs"]:
        assert set(r["statuses"]) == {"200"} and set(r["modes"]) <= {"cfg", "cca"}
        assert r["server_stats"]["overall"]["images"] >= r["images"]


def test_offline_bench_runs_a_var_model():
    from samplers import Pipeline

    pipe = Pipeline.from_registry("tiny-var-random")
    report = bench.run_offline(pipe, ["free", "cfg", "cca"], [1, 2], repeats=1, progress=False)
    cells = {(c["mode"], c["batch"]): c for c in report["cells"]}
    for (mode, _), c in cells.items():
        assert c["rows_x_steps_per_image"] == (2 if mode == "cfg" else 1) * 4  # 4 scales, one step each
    assert cells[("cfg", 2)]["gflop_per_batch"] == pytest.approx(2 * cells[("free", 2)]["gflop_per_batch"], rel=1e-6)
    # one scale step of one row: every per-token linear for each of its tokens, the AdaLN ones once
    var = pipe.gpt
    flops, _ = bench.decode_work(var, [1])
    per_row = sum(m.weight.numel() for n, m in var.named_modules() if isinstance(m, torch.nn.Linear) and "ada_lin" in n)
    per_token = bench.matmul_params(var) - per_row
    assert flops == 2 * per_token + 2 * per_row + 4 * var.config.depth * var.config.embed_dim
