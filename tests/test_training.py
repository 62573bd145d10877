"""CCA / DPO / unlearning losses, the trainers, the Shapes-1k dataset and the eval metrics."""
import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from cli import main
from cli.train import RECIPE
from evaluation.evaluate import EvalNet, frechet_distance, inception_score, precision_recall
from samplers import load_gpt
from samplers.pipeline import Pipeline
from tests.conftest import TINY_GPT, random_gpt
from training import shapes
from training.extrapolation import extrapolate
from training.losses import contrastive_pairs, preference_loss, sequence_logprob
from training.trainers import (
    CCATrainArgs,
    CodeData,
    GPTTrainArgs,
    VQTrainArgs,
    sample_codes,
    train_cca,
    train_gpt,
    train_vq,
)


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_cca_loss_hand_computed():
    # Three rows: row 0 a real negative, row 1 unconditional, row 2 rolled onto its own class.
    pos = torch.tensor([10.0, -5.0, 20.0])
    neg = torch.tensor([30.0, 4.0, -10.0])
    flags = torch.tensor([False, True, True])
    lam, beta = 10.0, 0.1
    # by hand: positives -mean(logsig(1.0), logsig(-0.5), logsig(2.0));
    # negatives: row 0 pushed down with weight lam (sign -1), rows 1, 2 pushed up with weight 1.
    pos_term = -(_logsig(1.0) + _logsig(-0.5) + _logsig(2.0)) / 3
    neg_term = -(10.0 * _logsig(-3.0) + _logsig(0.4) + _logsig(-1.0)) / 3
    expected_cca = (pos_term + neg_term) / 10.0
    assert preference_loss("cca", pos, neg, flags, lam, beta).item() == pytest.approx(expected_cca, rel=1e-6)
    expected_unlearn = (-(10 - 5 + 20) / 3 - (-10.0 * 30 + 4 - 10) / 3) / 10.0
    assert preference_loss("unlearn", pos, neg, flags, lam, beta).item() == pytest.approx(expected_unlearn, rel=1e-6)
    expected_dpo = -(_logsig(0.1 * -20) + _logsig(0.1 * -9) + _logsig(0.1 * 30)) / 3
    assert preference_loss("dpo", pos, neg, flags, lam, beta).item() == pytest.approx(expected_dpo, rel=1e-6)
    # lambda < 1: no rescaling below 1
    assert preference_loss("cca", pos, neg, flags, 0.5, beta).item() == pytest.approx(
        pos_term - (0.5 * _logsig(-3.0) + _logsig(0.4) + _logsig(-1.0)) / 3, rel=1e-6)
    with pytest.raises(ValueError, match="loss must be one of"):
        preference_loss("ppo", pos, neg, flags, lam, beta)


def test_cca_loss_matches_golden(golden):
    data = json.loads((golden / "cca_loss.json").read_text())
    pos, neg = torch.tensor(data["pos_gap"]), torch.tensor(data["neg_gap"])
    flags = torch.tensor(data["uncond_rows"]) | torch.tensor(data["same_class_rows"])
    for case in data["cases"]:
        for kind in ("cca", "dpo", "unlearn"):
            got = preference_loss(kind, pos, neg, flags, case["lambda"], case["beta"]).item()
            assert got == pytest.approx(case[kind], rel=1e-5, abs=1e-6), (kind, case)


def test_contrastive_pairs_roll_and_null_rows():
    labels = torch.tensor([3, 5, 5, 7, 1, 2, 9, 4])
    pairs = contrastive_pairs(labels, null_class=10, uncond_ratio=0.0)
    assert pairs.neg.tolist() == [4, 3, 5, 5, 7, 1, 2, 9]  # rolled by one
    assert pairs.same_class_rows.tolist() == [False, False, True, False, False, False, False, False]
    pairs = contrastive_pairs(labels, 10, uncond_ratio=0.5, generator=torch.Generator().manual_seed(0))
    u = pairs.uncond_rows
    assert 0 < int(u.sum()) < len(labels)
    assert (pairs.pos[u] == 10).all() and (pairs.neg[u] == 10).all()
    assert (pairs.pos[~u] == labels[~u]).all()
    assert not (pairs.same_class_rows & u).any()
    with pytest.raises(ValueError, match="uncond_ratio"):
        contrastive_pairs(labels, 10, uncond_ratio=1.5)


def test_contrastive_pairs_within_groups():
    """With a class -> group table, each row's negative comes from its own group unless it is the
    first of its group in the sort; rows keep their positives and the negatives are a permutation."""
    from training.trainers import negative_groups

    group_of = torch.arange(20) // 10  # classes 0-9: group 0, 10-19: group 1
    labels = torch.tensor([3, 12, 5, 17, 8, 11, 2, 19])
    pairs = contrastive_pairs(labels, null_class=20, uncond_ratio=0.0, group_of=group_of)
    assert torch.equal(pairs.pos, labels)
    assert sorted(pairs.neg.tolist()) == sorted(labels.tolist())
    # group 0 in batch order: rows 0, 2, 4, 6 (3, 5, 8, 2); group 1: rows 1, 3, 5, 7 (12, 17, 11, 19);
    # the stable sort puts group 0 first, so row 0 gets the last class of group 1 and row 1 group 0's last
    assert pairs.neg.tolist() == [19, 2, 3, 12, 5, 17, 8, 11]
    crossed = group_of[pairs.neg] != group_of[labels]
    assert int(crossed.sum()) == 2  # one per group present
    assert torch.equal(contrastive_pairs(labels, 20, 0.0).neg, torch.roll(labels, 1))  # no table: plain roll
    colour = negative_groups("colour", 1000)
    assert colour[207].item() == 0 and colour[217].item() == 1  # 207: red; 217: orange (class // 10 % 10)
    assert negative_groups(None, 1000) is None
    with pytest.raises(ValueError, match="negatives_within"):
        negative_groups("size", 1000)
    with pytest.raises(ValueError, match="1000 Shapes-1k classes"):
        negative_groups("colour", 10)


def _tiny_codes(n: int = 256, seed: int = 0) -> CodeData:
    # a learnable toy: each class has its own token pattern plus noise
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    base = torch.randint(0, 64, (10, 16), generator=g)
    noise = torch.randint(0, 64, (n, 16), generator=g)
    keep = torch.rand(n, 16, generator=g) < 0.8
    codes = torch.where(keep, base[labels], noise)
    return CodeData(codes.numpy(), labels.numpy())


def test_gpt_training_reduces_loss(tmp_path):
    data = _tiny_codes()
    gpt = train_gpt(tmp_path / "gpt", data, {k: v for k, v in TINY_GPT.items() if "dropout" not in k},
                    GPTTrainArgs(steps=60, batch_size=32, lr=3e-3), progress=False)
    log = json.loads((tmp_path / "gpt" / "train_log.json").read_text())["history"]
    assert log[-1]["loss"] < 0.6 * log[0]["loss"]
    again = load_gpt(tmp_path / "gpt")  # the saved model is the trained one
    c, x = data.labels[:4], data.codes[:4]
    assert torch.equal(sequence_logprob(again, c, x), sequence_logprob(gpt, c, x))


def test_gpt_training_continues_from_init_weights():
    """``init`` starts from a trained model (a second base stage), leaving that model untouched: a
    step at a negligible lr gives back the init model's likelihoods, not a fresh model's."""
    data = _tiny_codes()
    config = {k: v for k, v in TINY_GPT.items() if "dropout" not in k}
    first = train_gpt(None, data, config, GPTTrainArgs(steps=30, batch_size=32, lr=3e-3), progress=False)
    before = {k: v.clone() for k, v in first.state_dict().items()}
    fresh = train_gpt(None, data, config, GPTTrainArgs(steps=1, batch_size=32, lr=1e-9, seed=5), progress=False)
    cont = train_gpt(None, data, args=GPTTrainArgs(steps=1, batch_size=32, lr=1e-9, seed=5), progress=False,
                     init=first)
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in before.items())  # init not trained in place
    c, x = data.labels[:16], data.codes[:16]
    assert torch.allclose(sequence_logprob(cont, c, x), sequence_logprob(first, c, x), atol=1e-3)
    assert not torch.allclose(sequence_logprob(fresh, c, x), sequence_logprob(first, c, x), atol=1)
    with pytest.raises(ValueError, match="block_size"):
        train_gpt(None, CodeData(data.codes[:, :4].numpy(), data.labels.numpy()), init=first, progress=False)


def test_cca_training_separates_positive_from_negative(tmp_path):
    data = _tiny_codes()
    ref = random_gpt(0)
    ref.init_weights()
    before = ref.state_dict()["output.weight"].clone()
    args = CCATrainArgs(lam=10.0, beta=0.1, lr=3e-3, epochs=4, batch_size=32, uncond_ratio=0.1)
    policy = train_cca(tmp_path / "cca", ref, data, args, progress=False)
    log = json.loads((tmp_path / "cca" / "train_log.json").read_text())["history"]
    assert log[-1]["loss"] < log[0]["loss"]
    assert log[-1]["reward_acc"] > 0.9 and log[-1]["margin"] > log[0]["margin"]
    assert torch.equal(ref.state_dict()["output.weight"], before)  # the reference stays frozen
    # the fine-tuned model prefers each image's own class over another class
    c, x = data.labels[:50], data.codes[:50]
    with torch.no_grad():
        gap_pos = sequence_logprob(policy, c, x) - sequence_logprob(ref, c, x)
        gap_neg = sequence_logprob(policy, (c + 1) % 10, x) - sequence_logprob(ref, (c + 1) % 10, x)
    assert (gap_pos > gap_neg).float().mean() > 0.9


@pytest.mark.parametrize("loss", ["dpo", "unlearn"])
def test_baseline_losses_train(tmp_path, loss):
    ref = random_gpt(0)
    ref.init_weights()
    args = CCATrainArgs(loss=loss, lam=10.0, beta=0.1, lr=1e-3, epochs=1, batch_size=32)
    train_cca(tmp_path / loss, ref, _tiny_codes(), args, progress=False)
    log = json.loads((tmp_path / loss / "train_log.json").read_text())["history"]
    assert log[-1]["margin"] > log[0]["margin"]


def test_cca_dropout_flag():
    """--dropout trains with the model's dropout on (policy and reference alike) and leaves the
    caller's reference in the mode it came in; without it the run is deterministic dropout-free."""
    data = _tiny_codes(64)
    args = CCATrainArgs(lam=10.0, beta=0.1, lr=1e-3, batch_size=32, max_steps=2)

    def run(dropout: bool) -> torch.Tensor:
        ref = random_gpt(0, token_dropout_p=0.1, resid_dropout_p=0.1, ffn_dropout_p=0.1)
        policy = train_cca(None, ref, data, replace(args, dropout=dropout), progress=False)
        assert not ref.training  # the caller's (eval-mode) reference is handed back in eval mode
        return policy.state_dict()["output.weight"]

    plain = run(False)
    assert torch.equal(plain, run(False))
    assert not torch.allclose(plain, run(True))  # dropout changed the gradients


def test_cca_needs_null_class():
    with pytest.raises(ValueError, match="class dropout"):
        train_cca(None, random_gpt(0, class_dropout_prob=0.0), _tiny_codes(), CCATrainArgs(max_steps=1))


def test_vq_training_reduces_reconstruction_loss(tmp_path):
    config = {"codebook_size": 32, "ch": 16, "z_channels": 16, "norm_groups": 8}
    train_vq(tmp_path / "vq", config, VQTrainArgs(steps=30, batch_size=8, pool_size=64, lr=3e-3), progress=False)
    log = json.loads((tmp_path / "vq" / "train_log.json").read_text())["history"]
    assert log[-1]["rec"] < log[0]["rec"]
    meta = json.loads((tmp_path / "vq" / "config.json").read_text())
    assert meta["reconstruction"]["psnr_db"] > 0 and meta["config"]["codebook_size"] == 32


def test_code_data_llamagen_layout_round_trip(tmp_path):
    data = _tiny_codes(20)
    data.save(tmp_path / "codes.npz")
    data.save_llamagen(tmp_path / "lg")
    assert np.load(tmp_path / "lg" / "shapes_codes" / "3.npy").shape == (1, 1, 16)
    for loaded in (CodeData.load(tmp_path / "codes.npz"), CodeData.load(tmp_path / "lg")):
        assert torch.equal(loaded.codes, data.codes) and torch.equal(loaded.labels, data.labels)
    # one file with ten crops among single-view files: a broken extraction, said so
    np.save(tmp_path / "lg" / "shapes_codes" / "0.npy", np.stack([data.codes[0].numpy()] * 10)[None])
    with pytest.raises(ValueError, match="different numbers of augmentations"):
        CodeData.load(tmp_path / "lg" / "shapes_codes")
    with pytest.raises(FileNotFoundError):
        CodeData.load(tmp_path / "nothing")


def test_dataset_is_deterministic_per_seed():
    a, la = shapes.make_batch(0, range(5))
    b, lb = shapes.make_batch(0, range(5))
    c, _ = shapes.make_batch(1, range(5))
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert la.tolist() == [0, 1, 2, 3, 4]
    assert a.shape == (5, 3, 32, 32) and a.min() >= -1 and a.max() <= 1
    # an item does not depend on which other items are rendered with it
    assert torch.equal(shapes.ShapesDataset(10, 0)[3][0], a[3])


def test_class_names():
    names = shapes.class_names()
    assert len(names) == 1000 and len(set(names)) == 1000
    assert shapes.class_name(207) == "red shaded triangle"
    with pytest.raises(ValueError):
        shapes.class_name(1000)


def test_metrics_on_known_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 4, generator=g, dtype=torch.float64)
    mu, sigma = x.mean(0), torch.cov(x.T)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    # diagonal covariances: closed form sum (sqrt(a) - sqrt(b))^2 + |mu1 - mu2|^2
    s1, s2 = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64)), torch.diag(torch.tensor([9.0, 1.0],
                                                                                             dtype=torch.float64))
    m1, m2 = torch.zeros(2, dtype=torch.float64), torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(5.0 + (1 - 3) ** 2 + (2 - 1) ** 2)
    # IS: confident and uniform over classes -> number of classes; all the same -> 1
    logp = torch.log(torch.eye(10) * 0.999 + 0.0001)
    assert inception_score(torch.log_softmax(logp, 1)) == pytest.approx(10, rel=0.05)
    assert inception_score(torch.log_softmax(logp[[0] * 10], 1)) == pytest.approx(1.0)
    p, r = precision_recall(x[:500].float(), x[:500].float())
    assert p == r == 1.0
    p, r = precision_recall(x[:500].float(), x[:500].float() + 100)
    assert p == r == 0.0


def test_evalnet_class_posterior_is_a_distribution():
    net = EvalNet().eval()
    images, _ = shapes.make_batch(0, range(4))
    feats, heads = net(images)
    logp = EvalNet.class_log_probs(heads)
    assert feats.shape == (4, 128) and logp.shape == (4, 1000)
    assert torch.allclose(logp.exp().sum(1), torch.ones(4), atol=1e-5)


def test_train_all_quick_then_eval(tmp_path):
    """The whole recipe end to end at smoke-test size: train all, then eval with its validation
    sweep (every setting, the choices) and its test seed sets (the chosen settings only)."""
    from cli import main

    out, work, ev = tmp_path / "out", tmp_path / "work", tmp_path / "eval"
    assert main(["train", "all", "--quick", "--baselines", "--out", str(out), "--work", str(work)]) == 0
    for part in ("vq", "gpt", "cca_gpt", "cca_cfg_gpt", "evalnet"):
        assert (out / part / "model.safetensors").exists() and (out / part / "config.json").exists()
    # the base trains in two stages, the second on fresh images of other data seeds; it is shipped
    assert len(CodeData.load(work / "codes_more.npz")) == 100 and (work / "gpt" / "model.safetensors").exists()
    second = load_gpt(work / "gpt_more")
    shipped = load_gpt(out / "gpt").state_dict()
    assert all(torch.equal(v.half().float(), shipped[k]) for k, v in second.state_dict().items())
    assert len(json.loads((out / "class_names.json").read_text())) == 1000
    assert {p.name for p in work.glob("*_lam*")} == {"cca_lam30_beta0.05", "cca_lam30_beta0.05_seed1",
                                                     "cca_lam30_beta0.05_negcolour", "cca_lam30_beta0.1",
                                                     "dpo_lam30_beta0.05", "unlearn_lam30_beta0.05"}
    hard = json.loads((work / "cca_lam30_beta0.05_negcolour" / "config.json").read_text())["train"]
    assert hard["negatives_within"] == "colour"
    assert main(["eval", "--gpt-ckpt", str(out / "gpt"), "--cca-ckpt", str(out / "cca_gpt"), "--cca-cfg-ckpt",
                 str(out / "cca_cfg_gpt"), "--vq-ckpt", str(out / "vq"), "--evalnet", str(out / "evalnet"),
                 "--work", str(work), "--n", "40", "--n-val", "30", "--test-repeats", "2",
                 "--n-ref", "60", "--cfg-scales", "2,3", "--cca-cfg-scales", "2", "--quiet",
                 "--out", str(ev), "--device", "cpu"]) == 0
    report = json.loads((ev / "default.json").read_text())
    val = [e for e in report["entries"] if e["split"] == "validation"]
    test = [e for e in report["entries"] if e["split"] == "test"]
    assert [(e["mode"], e["sweep"]) for e in val] == [
        ("free", "free"), ("cfg", "cfg scale (base)"), ("cfg", "cfg scale (base)"), ("cca", "cca (shipped)"),
        ("cca+cfg", "cfg scale (cca+cfg)"), ("cca", "lambda (cca, β=0.05)"), ("cca", "hard negatives (cca)"),
        ("cca", "training seed (cca)"), ("cca", "lambda (cca, β=0.1)"), ("cca", "dpo"), ("cca", "unlearn")]
    assert all(e["n"] == 30 and e["seed_base"] == 0 for e in val)
    # the shipped model is the lambda=30 beta=0.05 restart of the recipe's data-order seed (1) at its chosen
    # step (2 of 3), extrapolated along its update from the fp16 base it started from, in fp16; every
    # restart keeps that step, so the seed's choice can be redone
    assert RECIPE["cca_ship_seed"] == 1
    assert (work / "cca_lam30_beta0.05" / "snapshots" / "step_00002" / "model.safetensors").exists()
    snapshot = load_gpt(work / "cca_lam30_beta0.05_seed1" / "snapshots" / "step_00002")
    shipped_weights = load_gpt(out / "cca_gpt").state_dict()
    expected = extrapolate(load_gpt(out / "gpt"), snapshot, 1.25).state_dict()
    assert all(torch.equal(v.half().float(), shipped_weights[k]) for k, v in expected.items())
    assert not all(torch.equal(v.half().float(), shipped_weights[k]) for k, v in snapshot.state_dict().items())
    meta = json.loads((out / "cca_gpt" / "config.json").read_text())
    assert meta["step"] == 2 and meta["extrapolation"]["alpha"] == 1.25 and meta["train"]["seed"] == 1
    final = load_gpt(work / "cca_lam30_beta0.05_seed1").state_dict()
    assert not all(torch.equal(v, shipped_weights[k]) for k, v in final.items())
    assert (val[6]["negatives_within"], val[6]["setting"]) == ("colour", "λ=30 β=0.05 within colour")
    assert ((work / "cca_lam30_beta0.05_negcolour" / "model.safetensors").read_bytes()   # other pairs,
            != (work / "cca_lam30_beta0.05" / "model.safetensors").read_bytes())        # other weights
    assert val[7]["train_seed"] == 1 and val[7]["model"] == "cca λ=30 β=0.05 seed=1"  # another data order:
    assert ((work / "cca_lam30_beta0.05_seed1" / "model.safetensors").read_bytes()       # other weights
            != (work / "cca_lam30_beta0.05" / "model.safetensors").read_bytes())
    assert (val[8]["lambda"], val[8]["beta"], val[8]["setting"]) == (30, 0.1, "λ=30 β=0.1")
    assert report["noise"]["training_seed_fid"][0]["model"] == "cca λ=30 β=0.05"
    # the test split: the chosen settings only, on other seeds, one row per mode and seed set
    best = min(val[1:3], key=lambda e: e["fid"])["cfg_scale"]
    assert report["chosen_on_validation"]["cfg_scale"] == best
    assert sorted((e["mode"], e["seed_set"]) for e in test) == sorted(
        (m, k) for m in ("free", "cfg", "cca", "cca+cfg") for k in (0, 1))
    assert all(e["n"] == 40 and e["seed_base"] >= 50_000_000 for e in test)
    assert {e["cfg_scale"] for e in test if e["mode"] == "cfg"} == {best}
    assert len({e["seed_base"] for e in test}) == 2
    summary = report["test"]
    assert summary["modes"]["cca"]["fid"]["runs"] == 2
    for m in ("fid", "accuracy", "shape_accuracy", "colour_accuracy", "texture_accuracy"):
        assert m in summary["cca_closes_of_cfg_gain"]
    assert test[0]["model"] == "base" and any(e["model"] == "cca_cfg" for e in test)
    cca_cfg_args = json.loads((out / "cca_cfg_gpt" / "config.json").read_text())["train"]
    assert (cca_cfg_args["lam"], cca_cfg_args["beta"]) == (1.0, 0.1)
    for e in report["entries"]:
        assert {"fid", "is", "precision", "recall", "accuracy", "shape_accuracy", "cfg_scale", "n"} <= set(e)
        assert e["rows_per_image"] == (2 if e["mode"] in ("cfg", "cca+cfg") else 1)
    md = (ev / "default.md").read_text()
    assert "Test split" in md and "cca closes" in md and (ev / "default_fid_is.png").stat().st_size > 1000

    # --add-to scores only the fine-tunes a report lacks, with its seeds and settings: the rows it
    # adds are the ones the full evaluation wrote, and the test split is left as it was
    model_args = ["--gpt-ckpt", str(out / "gpt"), "--cca-ckpt", str(out / "cca_gpt"), "--cca-cfg-ckpt",
                  str(out / "cca_cfg_gpt"), "--vq-ckpt", str(out / "vq"), "--evalnet", str(out / "evalnet"),
                  "--work", str(work), "--quiet", "--device", "cpu"]
    dropped = [e for e in report["entries"] if e["sweep"] in ("dpo", "unlearn")]
    (ev / "default.json").write_text(json.dumps({**report, "entries": [e for e in report["entries"]
                                                                       if e not in dropped]}))
    assert main(["eval", "--add-to", str(ev / "default.json"), *model_args]) == 0
    added = json.loads((ev / "default.json").read_text())
    assert added["entries"][-2:] == [{**e, "sample_seconds": a["sample_seconds"]}
                                     for e, a in zip(dropped, added["entries"][-2:], strict=True)]
    assert added["test"] == report["test"] and added["added"][0]["models"] == [e["model"] for e in dropped]
    assert main(["eval", "--add-to", str(ev / "default.json"), *model_args, "--temperature", "0.5"]) == 2

    # another shipped cca model (here the sweep's final weights): --rescore-shipped redoes its validation
    # and test rows in place, keeps the old ones under "replaced", and leaves every other row as it was
    other = [a if a != str(out / "cca_gpt") else str(work / "cca_lam30_beta0.05") for a in model_args]
    assert main(["eval", "--add-to", str(ev / "default.json"), "--rescore-shipped", *other]) == 0
    rescored = json.loads((ev / "default.json").read_text())
    was, now = added["entries"], rescored["entries"]
    assert len(now) == len(was)
    changed = [i for i, (a, b) in enumerate(zip(was, now, strict=True)) if a["sweep"] == "cca (shipped)"]
    assert len(changed) == 3 and all(now[i]["seed_base"] == was[i]["seed_base"] for i in changed)
    assert all(a == {**b, "sample_seconds": a["sample_seconds"]} for i, (a, b) in enumerate(zip(now, was, strict=True))
               if i not in changed)
    assert rescored["replaced"][0]["entries"] == [was[i] for i in changed]
    sweep_final = next(e for e in now if e["model"] == "cca λ=30 β=0.05")  # the same weights, the same row
    assert (now[changed[0]]["fid"], now[changed[0]]["accuracy"]) == (sweep_final["fid"], sweep_final["accuracy"])
    assert rescored["test"]["modes"]["cca"]["fid"]["mean"] == pytest.approx(
        sum(now[i]["fid"] for i in changed[1:]) / 2, abs=1e-3)
    assert "rescored" in (ev / "default.md").read_text()
    assert rescored["added"][-1]["shipped"] == "λ 30, β 0.05"  # what the rescored model is, from its config

    # without its own cca+cfg fine-tune (as the VAR), cca+cfg guides the shipped cca model: a rescore
    # redoes those rows too and chooses their scale again on the validation seeds
    base_args = ["--gpt-ckpt", str(out / "gpt"), "--vq-ckpt", str(out / "vq"), "--evalnet", str(out / "evalnet"),
                 "--work", str(tmp_path / "none"), "--quiet", "--device", "cpu"]
    ev2 = tmp_path / "eval2"
    assert main(["eval", *base_args, "--cca-ckpt", str(out / "cca_gpt"), "--n", "20", "--n-val", "20",
                 "--test-repeats", "1", "--n-ref", "60", "--cfg-scales", "2", "--cca-cfg-scales", "2,3",
                 "--out", str(ev2)]) == 0
    before = json.loads((ev2 / "default.json").read_text())
    assert main(["eval", "--add-to", str(ev2 / "default.json"), "--rescore-shipped", *base_args,
                 "--cca-ckpt", str(work / "cca_lam30_beta0.05")]) == 0
    after = json.loads((ev2 / "default.json").read_text())
    guided = [(a, b) for a, b in zip(before["entries"], after["entries"], strict=True) if a["mode"] == "cca+cfg"]
    assert len(guided) == 3 and all(a["model"] == b["model"] == "cca" for a, b in guided)
    fresh_args = [*base_args, "--cca-ckpt", str(work / "cca_lam30_beta0.05"), "--n", "20", "--n-val", "20",
                  "--test-repeats", "1", "--n-ref", "60", "--cfg-scales", "2", "--cca-cfg-scales", "2,3"]
    assert main(["eval", *fresh_args, "--out", str(tmp_path / "eval3")]) == 0  # the same rows from scratch
    fresh = [e for e in json.loads((tmp_path / "eval3" / "default.json").read_text())["entries"]
             if e["mode"] == "cca+cfg"]
    assert [(e["fid"], e["accuracy"], e["cfg_scale"]) for e in fresh] == [
        (b["fid"], b["accuracy"], b["cfg_scale"]) for _, b in guided]
    assert len(after["replaced"][0]["entries"]) == 5  # cca and cca+cfg: validation (1 + 2) and test (1 + 1)
    chosen = min((b for _, b in guided if b["split"] == "validation"), key=lambda e: e["fid"])["cfg_scale"]
    assert after["chosen_on_validation"]["cca_cfg_scale"] == chosen == guided[-1][1]["cfg_scale"]
    assert after["added"][-1]["rescored"] == "cca (shipped) and cca+cfg, which guides it"


def test_train_all_resume_mid_stage_gives_the_same_weights(tmp_path):
    """A stopped `train all` picks up inside a stage from its last checkpoint and ends with the
    weights an uninterrupted run gives, bit for bit."""
    from cli import main
    from cli import train as train_cli

    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert main(["train", "all", "--quick", "--out", str(whole / "out"), "--work", str(whole / "work")]) == 0
    real_fit = train_cli.train_gpt

    def stop_after_checkpoint(*a, **k):  # a run killed after the GPT's first checkpoint
        import training.trainers as tr

        original = tr._run

        def run(*args, after_step, **kwargs):
            def after(step, metrics):
                after_step(step, metrics)
                if step + 1 == 4:
                    raise KeyboardInterrupt
            return original(*args, after_step=after, **kwargs)

        tr._run = run
        try:
            return real_fit(*a, **k)
        finally:
            tr._run = original

    train_cli.train_gpt = stop_after_checkpoint
    try:
        try:
            main(["train", "all", "--quick", "--out", str(stopped / "out"), "--work", str(stopped / "work")])
        except KeyboardInterrupt:
            pass
    finally:
        train_cli.train_gpt = real_fit
    assert (stopped / "work" / "gpt" / "train_state.pt").exists() and not (stopped / "out" / "gpt").exists()
    with pytest.raises(SystemExit, match="stage gpt has no output"):  # --only needs what it builds on
        main(["train", "all", "--quick", "--resume", "--only", "cca_cfg", "--out", str(stopped / "out"),
              "--work", str(stopped / "work")])
    assert main(["train", "all", "--quick", "--resume", "--out", str(stopped / "out"),
                 "--work", str(stopped / "work")]) == 0
    # one stage run on its own (as stages run side by side) gives what the whole run gave
    (stopped / "out" / "cca_cfg_gpt" / "model.safetensors").unlink()
    (stopped / "work" / "codes_more.npz").unlink()  # the fresh images: only the kept second base stage used them
    assert main(["train", "all", "--quick", "--resume", "--only", "cca_cfg", "--out", str(stopped / "out"),
                 "--work", str(stopped / "work")]) == 0
    assert not (stopped / "work" / "codes_more.npz").exists()
    for part in ("vq", "gpt", "cca_gpt", "cca_cfg_gpt"):
        a = (whole / "out" / part / "model.safetensors").read_bytes()
        b = (stopped / "out" / part / "model.safetensors").read_bytes()
        assert a == b, part


def test_ten_crop_code_folders_draw_a_random_stored_augmentation(tmp_path):
    """LlamaGen's --ten-crop extraction stores [1, 10, T] per image; index 0 is a corner crop, so
    training must draw among all ten per item, as LlamaGen's dataset does."""
    import numpy as np

    n, aug, t = 6, 10, 4
    (tmp_path / "in_codes").mkdir()
    (tmp_path / "in_labels").mkdir()
    for i in range(n):  # code value = 100 * image + augmentation, so every draw says where it came from
        np.save(tmp_path / "in_codes" / f"{i}.npy",
                (100 * i + np.arange(aug))[None, :, None].repeat(t, axis=2).astype(np.int64))
        np.save(tmp_path / "in_labels" / f"{i}.npy", np.array([i % 3]))
    data = CodeData.load(tmp_path)
    assert data.augmentations.shape == (n, aug, t) and data.codes[:, 0].tolist() == [100 * i for i in range(n)]
    seen: dict[int, set[int]] = {i: set() for i in range(n)}
    for codes, labels in data.batches(3, seed=0, epochs=40):
        for row, label in zip(codes.tolist(), labels.tolist(), strict=True):
            image, view = divmod(row[0], 100)
            assert row == [row[0]] * t and label == image % 3  # one whole stored view, its own label
            seen[image].add(view)
    assert all(len(views) >= 8 for views in seen.values())  # ~40 draws each over 10 views


def test_keep_freed_memory_applies_on_glibc_linux():
    """The CLI's allocator settings take (mallopt accepts every value) where glibc is the C library."""
    import platform
    import sys

    from cli.common import keep_freed_memory

    glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is glibc


def test_sample_codes_are_the_pipelines_own_samples(tmp_path):
    pipe = Pipeline.from_registry("tiny-random")
    data = sample_codes(pipe, 5, seed_base=11, batch_size=2, progress=False)
    assert data.labels.tolist() == [0, 1, 2, 3, 4] and data.codes.shape == (5, pipe.gpt.config.block_size)
    direct = pipe([0, 1, 2, 3, 4], "free", seeds=[11, 12, 13, 14, 15])  # the sampler the server runs
    assert data.codes.tolist() == [list(r.tokens) for r in direct]
    with pytest.raises(ValueError, match="num_images"):
        sample_codes(pipe, 0)
    out = tmp_path / "self.npz"
    assert main(["train", "sample-codes", "--model", "tiny-random", "--num", "3", "--seed-base", "11",
                 "--out", str(out), "--quiet"]) == 0
    assert torch.equal(CodeData.load(out).codes, data.codes[:3])
