"""benchmarks/pixel_check.py: the pixel-space outside check of the modes."""
import pytest
import torch

from benchmarks import pixel_check
from tests.server_util import load_pipeline, serve, write_tiny_models
from training import shapes


def test_nearest_and_consistency_on_real_images():
    ref, ref_labels = pixel_check.reference(per_class=1, data_seed=7)
    means = pixel_check.class_means(ref, ref_labels)
    classes = torch.tensor([3, 3, 500, 500, 999, 999])
    # each class's reference image, twice: its own nearest reference and its twin are of its class
    images = ref[classes].view(-1, 3, shapes.IMAGE_SIZE, shapes.IMAGE_SIZE)
    scores = pixel_check.consistency(images, classes, ref, ref_labels, means)
    assert scores["self_nn"] == 1.0 and scores["nn_accuracy"] == 1.0 and scores["mean_accuracy"] == 1.0
    assert all(scores[f"nn_{a}"] == 1.0 for a in shapes.ATTRIBUTES)
    # the same images under other labels: every match is wrong
    wrong = pixel_check.consistency(images, torch.tensor([4, 4, 501, 501, 0, 0]), ref, ref_labels, means)
    assert wrong["nn_accuracy"] == 0.0 and wrong["self_nn"] == 1.0  # twins still share their (wrong) label
    assert pixel_check.nearest(ref[:5] + 1e-3, ref, chunk=2).tolist() == [0, 1, 2, 3, 4]


def test_fetch_samples_from_a_server(tmp_path):
    server, engine = serve(load_pipeline(write_tiny_models(tmp_path)), max_rows=8)
    with server:
        images, scale = pixel_check.fetch_samples(server.url, None, "cca", [1, 2],
                                                  per_class=pixel_check.MAX_N + 2, seed=5, timeout_s=60)
        again, _ = pixel_check.fetch_samples(server.url, "tiny", "cca", [2], per_class=3, seed=5, timeout_s=60)
        _, guided = pixel_check.fetch_samples(server.url, None, "cfg", [1], per_class=1, seed=5, timeout_s=60)
        with pytest.raises(RuntimeError, match="HTTP 422"):
            pixel_check.fetch_samples(server.url, None, "nonsense", [1], per_class=1, seed=5, timeout_s=60)
    engine.close()
    assert images.shape[0] == 2 * (pixel_check.MAX_N + 2) and images.shape[1] == 3
    assert images.min() >= -1.0 and images.max() <= 1.0
    assert (scale, guided) == (1.0, 3.0)  # the server's default scale for each mode is recorded
    # class order, and seeds seed, seed + 1, ...: class 2's first three images again
    assert torch.equal(again, images[pixel_check.MAX_N + 2:pixel_check.MAX_N + 5])


def test_summary_pools_runs_before_the_share():
    def run(free, cfg, cca):
        results = {"real": {"self_nn": 0.4}, "free": {"self_nn": free}, "cfg": {"self_nn": cfg},
                   "cca": {"self_nn": cca}}
        return {"results": results, "cca_share": pixel_check.cca_shares(results)}

    runs = [run(0.4, 0.6, 0.5), run(0.5, 0.5, 0.6)]  # the second run: CFG gains nothing, no share
    summary = pixel_check.summarize(runs)
    assert summary["cca_share_per_run"]["self_nn"] == [pytest.approx(0.5), None]
    assert summary["mean"]["cca"]["self_nn"] == pytest.approx(0.55)
    assert summary["cca_share"]["self_nn"] == pytest.approx((0.55 - 0.45) / (0.55 - 0.45))
    assert summary["std"]["free"]["self_nn"] == pytest.approx(0.0707, abs=1e-3)


def test_update_rescores_only_the_named_modes_on_the_same_runs(tmp_path, monkeypatch):
    import argparse
    import json

    # the tiny model knows 10 classes and draws smaller images than the real ones: score a fingerprint of
    # the images instead, which comes back the same only if the same images are fetched
    monkeypatch.setattr(pixel_check, "run_classes", lambda seed, n: sorted(
        torch.randperm(10, generator=torch.Generator().manual_seed(seed))[:n].tolist()))
    monkeypatch.setattr(pixel_check, "consistency", lambda images, classes, *_: {
        "self_nn": images.mean().item(), "nn_accuracy": (images * classes.view(-1, 1, 1, 1)).std().item()})
    args = argparse.Namespace(url="", model=None, modes="free,cfg,cca", classes=3, per_class=2, ref_per_class=1,
                              seed=4, repeats=2, data_seed=7, timeout=60.0, why="")
    ref, ref_labels = pixel_check.reference(args.ref_per_class, args.data_seed)
    means = pixel_check.class_means(ref, ref_labels)
    server, engine = serve(load_pipeline(write_tiny_models(tmp_path)), max_rows=8)
    with server:
        args.url = server.url
        runs = [pixel_check.run_once(args, args.seed + i, ref, ref_labels, means) for i in range(args.repeats)]
        path = tmp_path / "check.json"
        path.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "runs": runs,
                                    "summary": pixel_check.summarize(runs)}))
        again = argparse.Namespace(**{**vars(args), "modes": "cca", "classes": 999, "why": "new cca"})
        pixel_check.update(again, path)
        with pytest.raises(SystemExit, match="cca\\+cfg not in"):
            pixel_check.update(argparse.Namespace(**{**vars(args), "modes": "cca+cfg"}), path)
    engine.close()
    record = json.loads(path.read_text())
    # the same server and model: the run's classes and seeds were reused, so the numbers come back the same
    assert [r["results"] for r in record["runs"]] == [r["results"] for r in runs]
    assert record["summary"] == json.loads(json.dumps(pixel_check.summarize(runs)))
    assert record["replaced"][0]["why"] == "new cca"
    assert record["replaced"][0]["results"] == {"cca": [{**r["results"]["cca"], "cfg_scale": 1.0} for r in runs]}
    assert [r["cfg_scales"] for r in record["runs"]] == [{"free": 1.0, "cfg": 3.0, "cca": 1.0}] * 2
