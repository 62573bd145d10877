"""The reward-vs-guidance contrast diagnostic (`ccaserve contrast`)."""
import json

import pytest
import torch

from cli import main
from evaluation import contrast
from evaluation.evaluate import attribute_targets
from samplers import load_var, load_var_vae
from samplers.registry import Registry
from tests.conftest import TINY_GPT, random_gpt
from training.losses import sequence_logprob


def test_contrast_stats_reads_a_uniform_tilt_as_its_scale():
    dg = torch.randn(500, generator=torch.Generator().manual_seed(0)) * 10
    s = contrast.contrast_stats(dg, 2.0 * dg)  # what a sequence-level guidance of scale 3 would give
    assert s["slope"] == pytest.approx(2.0) and s["effective_scale"] == pytest.approx(3.0)
    assert s["corr"] == pytest.approx(1.0)
    assert contrast.contrast_stats(dg, torch.zeros_like(dg))["effective_scale"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equal 1-d"):
        contrast.contrast_stats(dg, dg[:10])


def test_tilt_by_quantile_is_flat_for_guidance_and_falls_for_a_margin():
    dg = torch.rand(1000, generator=torch.Generator().manual_seed(0)) * 300 + 50
    assert contrast.tilt_by_quantile(dg, 0.8 * dg) == pytest.approx([0.8] * contrast.QUANTILES)
    margin = contrast.tilt_by_quantile(dg, torch.full_like(dg, 200.0))  # the same dr for every pair
    assert len(margin) == contrast.QUANTILES and all(a > b for a, b in zip(margin[:-1], margin[1:], strict=True))
    # bin k holds the k-th fifth of dg: its ratio is dr over that fifth's mean dg
    lowest = torch.sort(dg).values[:200]
    assert margin[0] == pytest.approx(200.0 / float(lowest.mean()), rel=1e-6)
    assert contrast.tilt_by_quantile(dg[:9], dg[:9]) == []  # fewer than two rows per bin
    assert contrast.contrast_stats(dg, 0.8 * dg)["tilt_by_quantile"] == pytest.approx([0.8] * contrast.QUANTILES)


def test_negatives_differ_as_named():
    labels = torch.arange(1000).repeat(2)
    gen = torch.Generator().manual_seed(0)
    attrs = attribute_targets(labels)
    for which, (name, neg) in enumerate(contrast.attribute_negatives(labels, gen).items()):
        assert name == ("shape", "colour", "texture")[which]
        differs = attribute_targets(neg) != attrs
        assert differs[:, which].all() and not differs.sum(1).gt(1).any()
    rolled = contrast.rolled_negatives(labels, gen)
    assert sorted(rolled.tolist()) == sorted(labels.tolist())  # a permutation of the batch's own labels
    # shuffled before rolling: a class-ordered set must not give only last-attribute changes
    assert ((rolled // 10) != (labels // 10)).float().mean() > 0.5
    with pytest.raises(ValueError, match="Shapes-1k"):
        contrast.attribute_negatives(torch.tensor([1000]))


def test_reward_contrast_is_the_reward_difference():
    ref, tuned = random_gpt(0), random_gpt(1)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, TINY_GPT["vocab_size"], (12, TINY_GPT["block_size"]), generator=gen)
    labels = torch.arange(12) % TINY_GPT["num_classes"]
    negatives = {"next": (labels + 1) % TINY_GPT["num_classes"]}
    report = contrast.reward_contrast(ref, {"tuned": tuned, "same": ref}, codes, labels, negatives,
                                      batch_size=5, progress=False)
    with torch.no_grad():
        r_own = sequence_logprob(tuned, labels, codes) - sequence_logprob(ref, labels, codes)
        r_neg = sequence_logprob(tuned, negatives["next"], codes) - sequence_logprob(ref, negatives["next"], codes)
        dg = sequence_logprob(ref, labels, codes) - sequence_logprob(ref, negatives["next"], codes)
    got = report["tuned"]["next"]
    assert got["reward_contrast_mean"] == pytest.approx(float((r_own - r_neg).mean()), rel=1e-4, abs=1e-4)
    assert got["base_contrast_mean"] == pytest.approx(float(dg.mean()), rel=1e-4, abs=1e-4)
    assert got["reward_own_mean"] == pytest.approx(float(r_own.mean()), rel=1e-4, abs=1e-4)
    assert got["reward_neg_mean"] == pytest.approx(float(r_neg.mean()), rel=1e-4, abs=1e-4)
    assert report["same"]["next"]["slope"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="negatives 'bad'"):
        contrast.reward_contrast(ref, {"t": tuned}, codes, labels, {"bad": labels[:3]}, progress=False)


def test_guided_logprobs_are_the_distribution_cfg_samples_from():
    base = random_gpt(0)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, TINY_GPT["vocab_size"], (7, TINY_GPT["block_size"]), generator=gen)
    labels = torch.tensor([0, 3, 7, 9, 1, 2, 5])
    other = (labels + 4) % TINY_GPT["num_classes"]
    null = torch.full_like(labels, TINY_GPT["num_classes"])
    own, guided = contrast.logprobs_by_class(base, codes, {"own": labels, "other": other},
                                             cfg_scales=(0.0, 1.0, 3.0), batch_size=3)
    with torch.no_grad():
        uncond = sequence_logprob(base, null, codes)
        for kind, cls in {"own": labels, "other": other}.items():
            cond = sequence_logprob(base, cls, codes)
            assert torch.allclose(own[kind], cond, atol=1e-4)
            assert torch.allclose(guided[1.0][kind], cond, atol=1e-4)
            assert torch.allclose(guided[0.0][kind], uncond, atol=1e-4)
            # s = 3 by hand, token by token: softmax of u + 3 (c - u)
            c_logits, u_logits = base(cls, codes[:, :-1]), base(null, codes[:, :-1])
            by_hand = torch.log_softmax(u_logits + 3.0 * (c_logits - u_logits), -1)
            by_hand = by_hand.gather(-1, codes.unsqueeze(-1)).squeeze(-1).sum(1)
            assert torch.allclose(guided[3.0][kind], by_hand, atol=1e-4)
    # and reward_contrast reports them as models: scale 1 is the base itself (no change of contrast)
    report = contrast.reward_contrast(base, {}, codes, labels, {"other": other}, cfg_scales=(1.0, 3.0),
                                      batch_size=3, progress=False)
    assert list(report) == ["cfg s=1", "cfg s=3"]
    assert report["cfg s=1"]["other"]["slope"] == pytest.approx(0.0, abs=1e-5)
    dr = (guided[3.0]["own"] - own["own"]) - (guided[3.0]["other"] - own["other"])
    assert report["cfg s=3"]["other"]["reward_contrast_mean"] == pytest.approx(float(dr.mean()), rel=1e-4, abs=1e-4)


def test_var_guided_logprobs_follow_vars_ramp():
    """For VAR the distribution CFG samples from guides each scale with its own scale of the ramp
    (1 at the first scale, s at the last), as the VAR sampler does."""
    from samplers.var import scale_guidance
    from tests.conftest import GOLDEN
    from training.losses import teacher_inputs

    vae = load_var_vae(GOLDEN / "var_tiny_vae.pt")
    var = load_var(GOLDEN / "var_tiny_var.pt", vae).eval()
    config = var.config
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, vae.config.vocab_size, (3, config.block_size), generator=gen)
    labels = torch.tensor([1, 4, 7])
    _, guided = contrast.logprobs_by_class(var, codes, {"own": labels}, cfg_scales=(3.0,), batch_size=2)
    with torch.no_grad():
        inputs = teacher_inputs(var, codes)
        cond = var(labels, inputs)
        uncond = var(torch.full_like(labels, config.null_class), inputs)
    by_hand = torch.zeros(3, config.num_scales)
    for k, (start, pn) in enumerate(zip(config.scale_starts, config.patch_nums, strict=True)):
        s = scale_guidance(3.0, k, config.num_scales, "linear")
        at = slice(start, start + pn * pn)
        logp = torch.log_softmax(uncond[:, at] + s * (cond[:, at] - uncond[:, at]), -1)
        by_hand[:, k] = logp.gather(-1, codes[:, at].unsqueeze(-1)).squeeze(-1).sum(1)
    assert torch.allclose(guided[3.0]["own"], by_hand.sum(1), atol=1e-3)
    assert contrast.guidance_by_position(var, 3.0)[0].item() == 1.0  # the first scale is unguided
    # split by scale: each scale's own tokens, the same numbers before the sum
    own_split, guided_split = contrast.logprobs_by_class(var, codes, {"own": labels}, cfg_scales=(3.0,),
                                                         batch_size=2, by_scale=True)
    assert guided_split[3.0]["own"].shape == (3, config.num_scales)
    assert torch.allclose(guided_split[3.0]["own"], by_hand, atol=1e-3)
    unguided = torch.log_softmax(cond, -1).gather(-1, codes.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(own_split["own"][:, -1], unguided[:, config.scale_starts[-1]:].sum(1), atol=1e-3)


def test_contrast_cli_on_the_small_var(tmp_path):
    assert main(["contrast", "--model", "shapes1k-var", "--n", "24", "--out", str(tmp_path), "--name", "v",
                 "--quiet"]) == 0
    report = json.loads((tmp_path / "v.json").read_text())
    scale = Registry().get("shapes1k-var").default_cfg_scale
    assert set(report["models"]) == {"cca", f"cfg s={scale:g}"}
    assert set(report["models"]["cca"]) == {"rolled (as trained)", "shape", "colour", "texture"}
    # where the tilt goes, scale by scale: the scales' contrasts add up to the image's
    rolled = report["models"]["cca"]["rolled (as trained)"]
    assert len(rolled["by_scale"]) == 6  # the small VAR's scales: 1, 2, 3, 4, 6, 8 tokens a side
    assert sum(k["base_contrast_mean"] for k in rolled["by_scale"]) == pytest.approx(rolled["base_contrast_mean"],
                                                                                    rel=1e-4)
    assert sum(k["reward_contrast_mean"] for k in rolled["by_scale"]) == pytest.approx(
        rolled["reward_contrast_mean"], rel=1e-4, abs=1e-3)
    assert "## By scale" in (tmp_path / "v.md").read_text() and (tmp_path / "v_by_scale.png").stat().st_size > 1000


def test_contrast_cli_on_the_default_model(tmp_path):
    assert main(["contrast", "--n", "40", "--out", str(tmp_path), "--name", "c", "--quiet"]) == 0
    report = json.loads((tmp_path / "c.json").read_text())
    scale = Registry().get().default_cfg_scale  # measured at the model's default scale
    assert set(report["models"]) == {"cca", "cca+cfg model", f"cfg s={scale:g}"}
    assert set(report["models"]["cca"]) == {"rolled (as trained)", "shape", "colour", "texture"}
    assert report["models"]["cca"]["colour"]["n"] == 40
    assert (tmp_path / "c.png").stat().st_size > 1000 and "effective scale" in (tmp_path / "c.md").read_text()
    assert "by_scale" not in report["models"]["cca"]["colour"] and not (tmp_path / "c_by_scale.png").exists()
    assert main(["contrast", "--n", "10", "--out", str(tmp_path), "--also", str(tmp_path / "missing")]) == 2
