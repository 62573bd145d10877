"""CCA for VAR: the paper's loss on VAR's own log-likelihoods, a few steps that learn, checkpoints in
VAR's layout, and 2 gloo ranks equal to one process accumulating the same micro-batches."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import samplers
from samplers import load_var, load_var_vae, save_pretrained
from tests.conftest import GOLDEN
from tests.test_distributed import _ccaserve, _run, _torchrun
from training.extrapolation import extrapolate
from training.losses import contrastive_pairs, preference_loss, sequence_logprob, teacher_inputs
from training.trainers import CCATrainArgs, CodeData, extract_codes, extract_var_codes, train_cca


@pytest.fixture(scope="module")
def tiny():
    vae = load_var_vae(GOLDEN / "var_tiny_vae.pt")
    return vae, load_var(GOLDEN / "var_tiny_var.pt", vae)


def _codes(var, n=32, seed=0) -> CodeData:
    """The model's own samples as training data (tokens of all scales, their classes)."""
    labels = [i % 10 for i in range(n)]
    tokens = samplers.generate(var, labels, seeds=[seed * 1000 + i for i in range(n)], top_k=20)
    return CodeData(tokens.numpy(), np.asarray(labels))


def test_var_log_likelihood_is_vars_and_the_loss_is_the_formula(tiny):
    vae, var = tiny
    e = torch.load(GOLDEN / "var_tiny_expected.pt", weights_only=True)
    with torch.no_grad():
        lp = sequence_logprob(var, e["tf_labels"], e["gt_BL"])
    torch.testing.assert_close(lp, e["tf_seq_logp"], rtol=0, atol=2e-3)  # summed over 55 tokens
    # the CCA loss on these log-likelihoods is the spec's formula, written out by hand
    gen = torch.Generator().manual_seed(0)
    codes = torch.cat([e["gt_BL"]] * 3)
    labels = torch.tensor([1, 2, 3, 4, 5, 6])
    pairs = contrastive_pairs(labels, 10, 0.0, gen)
    with torch.no_grad():
        pos, neg = sequence_logprob(var, pairs.pos, codes), sequence_logprob(var, pairs.neg, codes)
    ref_pos, ref_neg = pos - 1.0, neg + 0.5  # a reference with known gaps
    lam, beta = 50.0, 0.02
    loss = preference_loss("cca", pos - ref_pos, neg - ref_neg, pairs.negative_is_positive, lam, beta)
    by_hand = (-torch.nn.functional.logsigmoid(torch.tensor(beta * 1.0)) * 6
               - lam * torch.nn.functional.logsigmoid(torch.tensor(beta * 0.5)) * 6) / 6 / lam
    assert not pairs.negative_is_positive.any()
    torch.testing.assert_close(loss, by_hand, rtol=1e-5, atol=1e-6)


def test_a_few_cca_steps_learn_and_save_in_vars_layout(tiny, tmp_path):
    vae, var = tiny
    data = _codes(var)
    args = CCATrainArgs(lam=10.0, beta=0.1, lr=3e-3, batch_size=8, max_steps=12, uncond_ratio=0.1, epochs=3.0,
                        dropout=False)
    tuned = train_cca(tmp_path / "cca", var, data, args, progress=False)
    history = __import__("json").loads((tmp_path / "cca" / "train_log.json").read_text())["history"]
    first, last = history[0], history[-1]
    assert last["loss"] < first["loss"] and last["reward_acc"] > first["reward_acc"]
    # the tuned model loads here and has VAR's keys and shapes (VAR's own code loads it strictly)
    again = load_var(tmp_path / "cca", vae)
    theirs = torch.load(GOLDEN / "var_tiny_var.pt", weights_only=True)
    mine = load_file(str(tmp_path / "cca" / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in mine.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    x = teacher_inputs(var, torch.from_numpy(np.asarray(data.codes[:2])))
    with torch.no_grad():
        torch.testing.assert_close(again(data.labels[:2], x), tuned(data.labels[:2], x), rtol=0, atol=1e-5)
    torch.save(tuned.state_dict(), tmp_path / "VAR_tiny_CCA.pth")  # a top-level state dict, as the CCA release
    load_var(tmp_path / "VAR_tiny_CCA.pth", vae)


def test_extract_codes_from_an_image_folder(tiny, tmp_path):
    vae, _ = tiny
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (90, 100, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    data = extract_var_codes(vae, tmp_path / "imgs", progress=False)
    assert data.codes.shape == (6, 55) and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.augmentations.shape == (6, 2, 55)  # the image and its mirror
    data.save(tmp_path / "codes.npz")
    back = CodeData.load(tmp_path / "codes.npz")
    assert torch.equal(back.augmentations.long(), data.augmentations.long())
    # in chunks on disk: the same codes; a stopped run resumes from the chunks it finished
    chunked = extract_var_codes(vae, tmp_path / "imgs", progress=False, parts=tmp_path / "parts", chunk_size=4)
    assert sorted(p.name for p in (tmp_path / "parts").glob("chunk_*")) == ["chunk_000000.npy", "chunk_000001.npy"]
    assert torch.equal(chunked.augmentations, data.augmentations) and torch.equal(chunked.labels, data.labels)
    (tmp_path / "parts" / "chunk_000001.npy").unlink()
    resumed = extract_var_codes(vae, tmp_path / "imgs", progress=False, parts=tmp_path / "parts", chunk_size=4)
    assert torch.equal(resumed.augmentations, data.augmentations)
    with pytest.raises(ValueError, match="another extraction"):
        extract_var_codes(vae, tmp_path / "imgs", progress=False, parts=tmp_path / "parts", chunk_size=2)


def test_extract_codes_rendered_in_worker_processes_equals_one_process():
    from samplers.registry import Registry
    from training.trainers import extract_codes

    vae = Registry().get("shapes1k-var").load_part("vq", "cpu")  # the shipped VQVAE: Shapes-1k's 32 px
    one = extract_codes(vae, 40, batch_size=10, progress=False)
    two = extract_codes(vae, 40, batch_size=10, progress=False, workers=2)
    assert torch.equal(one.codes, two.codes) and torch.equal(one.labels, two.labels)


def test_extract_codes_on_two_ranks_equals_one_process(tiny, tmp_path):
    vae, _ = tiny
    save_pretrained(vae, tmp_path / "vae")
    rng = np.random.default_rng(1)
    for c in ("a", "b", "c"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    common = ["extract-codes", "--vae", "vae", "--images", "imgs", "--chunk-size", "2", "--device", "cpu", "--quiet"]
    _run(_torchrun(*common, "--out", "ranks.npz"), tmp_path)
    _run(_ccaserve(*common, "--out", "one.npz"), tmp_path)
    two, one = CodeData.load(tmp_path / "ranks.npz"), CodeData.load(tmp_path / "one.npz")
    assert len(one) == 9 and torch.equal(two.augmentations, one.augmentations)
    assert torch.equal(two.labels, one.labels)
    assert len(list((tmp_path / "ranks.npz.parts").glob("chunk_*.npy"))) == 5  # 9 images in chunks of 2


def test_two_ranks_equal_one_process_accumulating(tiny, tmp_path):
    vae, var = tiny
    save_pretrained(var, tmp_path / "ref")
    save_pretrained(vae, tmp_path / "vae")
    _codes(var, n=16).save(tmp_path / "codes.npz")
    common = ["train", "cca", "--ref", "ref", "--vae", "vae", "--codes", "codes.npz", "--batch-size", "8",
              "--max-steps", "2", "--lr", "1e-3", "--lambda", "10", "--beta", "0.1", "--uncond-ratio", "0.25",
              "--no-dropout"]
    _run(_torchrun(*common, "--out", "ddp"), tmp_path)
    _run(_ccaserve(*common, "--out", "accum", "--grad-accum", "2"), tmp_path)
    a, b, ref = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("ddp", "accum", "ref"))
    assert max((a[k].float() - ref[k].float()).abs().max().item() for k in a) > 1e-4  # it trained
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_a_small_var_trains_here_from_nothing(tmp_path):
    """VAR's VQVAE and next-scale transformer trained on Shapes-1k: both losses fall, the parts save
    and load as a registry-style pair, and the model samples."""
    import json

    from training.trainers import VARTrainArgs, VARVAETrainArgs, extract_codes, train_var, train_var_vae

    vae = train_var_vae(tmp_path / "vae", {"ch": 32, "vocab_size": 64, "z_channels": 8},
                        VARVAETrainArgs(steps=30, pool_size=200, restart_every=10), progress=False)
    vae_log = json.loads((tmp_path / "vae" / "train_log.json").read_text())["history"]
    assert vae_log[-1]["rec"] < vae_log[0]["rec"]
    data = extract_codes(vae, 64, progress=False)
    assert data.seq_len == 1 + 4 + 9 + 16 + 36 + 64
    var = train_var(tmp_path / "var", vae, data, {"depth": 2, "embed_dim": 64, "num_heads": 2},
                    VARTrainArgs(steps=25, batch_size=16, lr=3e-3), progress=False)
    log = json.loads((tmp_path / "var" / "train_log.json").read_text())["history"]
    assert log[-1]["loss"] < log[0]["loss"]
    vae2 = load_var_vae(tmp_path / "vae")
    var2 = load_var(tmp_path / "var", vae2)
    assert var2.config.cond_drop_rate == 0.1 and var2.config.patch_nums == [1, 2, 3, 4, 6, 8]
    tokens = samplers.generate(var2, [207], seeds=[0], cfg_scale=2.0)
    assert tokens.shape == (1, 130) and vae2.decode_code(tokens).shape == (1, 3, 32, 32)
    assert torch.equal(tokens, samplers.generate(var, [207], seeds=[0], cfg_scale=2.0))


def test_var_training_commands(tmp_path):
    from cli import main

    assert main(["train", "var-vae", "--out", str(tmp_path / "vae"), "--steps", "3", "--quiet"]) == 0
    assert main(["train", "var-codes", "--vae", str(tmp_path / "vae"), "--num", "32",
                 "--out", str(tmp_path / "codes.npz")]) == 0
    assert main(["train", "var", "--vae", str(tmp_path / "vae"), "--codes", str(tmp_path / "codes.npz"),
                 "--out", str(tmp_path / "var"), "--depth", "2", "--embed-dim", "64", "--num-heads", "2",
                 "--steps", "2", "--batch-size", "8"]) == 0
    assert load_var(tmp_path / "var", load_var_vae(tmp_path / "vae")).config.depth == 2


def test_train_all_builds_the_small_var_family(tmp_path):
    """`train all --family var` at smoke size: VAR's VQVAE, its codes, the VAR, the shipped CCA
    fine-tune and the eval's baselines; the shipped parts load as a pipeline that samples every mode,
    and the tokenizer's reconstructions go through the family's own encode/decode."""
    from cli import main
    from cli.train import VAR_RECIPE, _quick
    from evaluation import evaluate
    from samplers.pipeline import Pipeline
    from training.recipes import variant_name

    out, work = tmp_path / "shapes1k", tmp_path / "runs"
    assert main(["train", "all", "--quick", "--family", "var", "--baselines", "--out", str(out),
                 "--work", str(work)]) == 0
    assert not out.exists()  # the LlamaGen family's folders are not touched
    out_var, work_var = tmp_path / "shapes1k_var", tmp_path / "runs_var"
    assert {p.name for p in out_var.iterdir()} == {"vae", "var", "cca_var"}
    # the VAR trains on the fine-tunes' codes (data seed 0) and fresh images of other data seeds
    quick = _quick(VAR_RECIPE, "var")
    codes, more = CodeData.load(work_var / "codes.npz"), CodeData.load(work_var / "codes_more.npz")
    assert len(codes.labels) == quick["var_codes"]["num"]
    fresh = extract_codes(load_var_vae(out_var / "vae"), quick["var_codes_more"]["num"],
                          quick["var_codes_more"]["data_seeds"][0], progress=False)
    assert torch.equal(more.codes, fresh.codes) and torch.equal(more.labels, fresh.labels)
    lam, beta = VAR_RECIPE["cca"]["lam"], VAR_RECIPE["cca"]["beta"]
    tuned = variant_name("cca", lam, beta, 0)  # the shipped setting: the quick recipe sweeps nothing else
    assert {p.name for p in work_var.glob("*_lam*")} == {tuned, variant_name("cca", lam, beta, 1),
                                                         variant_name("cca", lam, beta, 0, "colour"),
                                                         variant_name("dpo", lam, beta, 0),
                                                         variant_name("unlearn", lam, beta, 0)}
    # the shipped model is that fine-tune extrapolated along its update from the fp16 base, in fp16
    shipped = out_var / "cca_var" / "model.safetensors"
    vae = load_var_vae(out_var / "vae")
    alpha = VAR_RECIPE["cca_ship_alpha"]
    expected = extrapolate(load_var(out_var / "var", vae), load_var(work_var / tuned, vae), alpha)
    shipped_weights = load_var(out_var / "cca_var", vae).state_dict()
    assert all(torch.equal(v.half().float(), shipped_weights[k]) for k, v in expected.state_dict().items())
    shipped_bytes = shipped.read_bytes()
    assert shipped_bytes != (work_var / tuned / "model.safetensors").read_bytes()
    pipe = Pipeline(load_var(out_var / "var", vae), vae, cca_gpt=load_var(out_var / "cca_var", vae))
    for mode in ("free", "cfg", "cca", "cca+cfg"):
        assert pipe.sample_images([207], mode, [0]).shape == (1, 3, 32, 32)
    images, _ = evaluate.shapes.make_batch(0, range(4))
    codes = pipe.family.images_to_codes(images)
    assert codes.shape == (4, 130) and torch.equal(codes, torch.cat(vae.img_to_idx(images), dim=1))
    # --resume keeps every finished stage; --only runs the named one (a VAR stage: var_*)
    assert main(["train", "all", "--quick", "--family", "var", "--resume", "--out", str(out),
                 "--work", str(work)]) == 0
    assert shipped.read_bytes() == shipped_bytes
    # a fine-tune redone on a kept base needs the fine-tunes' codes, not the base's fresh images
    dpo = work_var / variant_name("dpo", lam, beta, 0)
    dpo_bytes = (dpo / "model.safetensors").read_bytes()
    shutil.rmtree(dpo)
    (work_var / "codes_more.npz").unlink()
    assert main(["train", "all", "--quick", "--family", "var", "--resume", "--baselines", "--only",
                 "var_" + dpo.name, "--out", str(out), "--work", str(work)]) == 0
    assert (dpo / "model.safetensors").read_bytes() == dpo_bytes and not (work_var / "codes_more.npz").exists()
    with pytest.raises(SystemExit, match="stage var_vae has no output"):
        main(["train", "all", "--quick", "--only", "var_" + tuned, "--out", str(tmp_path / "o2"),
              "--work", str(tmp_path / "w2")])
