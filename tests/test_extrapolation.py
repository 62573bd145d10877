"""Weight extrapolation of a fine-tune (training/extrapolation.py) and `ccaserve train extrapolate`."""

import json

import pytest
import torch

from cli import main
from samplers import generate, load_gpt, load_var, load_var_vae, save_pretrained
from tests.conftest import GOLDEN, random_gpt
from training.extrapolation import extrapolate


def test_extrapolation_is_ref_plus_alpha_times_the_update():
    ref, tuned = random_gpt(0), random_gpt(1)
    r, t = ref.state_dict(), tuned.state_dict()
    for alpha in (0.0, 1.0):  # the ends are the two models themselves, bit for bit
        out = extrapolate(ref, tuned, alpha).state_dict()
        assert all(torch.equal(out[k], (r if alpha == 0 else t)[k]) for k in t)
    out = extrapolate(ref, tuned, 1.25).state_dict()
    for k, v in t.items():
        expected = (r[k].double() + 1.25 * (v.double() - r[k].double())).float()
        assert torch.equal(out[k], expected), k
        assert not torch.equal(out[k], v) or torch.equal(r[k], v)
    # the inputs are left alone, and the result samples like any GPT (one pass per token)
    assert all(torch.equal(tuned.state_dict()[k], t[k]) for k in t)
    assert generate(extrapolate(ref, tuned, 1.25), [3, 4], seeds=[0, 1]).shape == (2, 16)


def test_extrapolation_keeps_a_vars_index_buffers():
    vae = load_var_vae(GOLDEN / "var_tiny_vae.pt")
    ref, tuned = load_var(GOLDEN / "var_tiny_var.pt", vae), load_var(GOLDEN / "var_tiny_var.pt", vae)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(0.01)
    out = extrapolate(ref, tuned, 2.0).state_dict()
    params = dict(ref.named_parameters())
    assert not torch.isfinite(ref.state_dict()["attn_bias_for_masking"]).all()  # -inf - -inf would be NaN
    for k, v in ref.state_dict().items():
        if k in params:
            torch.testing.assert_close(out[k], v + 0.02, rtol=0, atol=1e-6)
        else:  # buffers: the index table and the block-causal mask, as they were
            assert torch.equal(out[k], v), k


def test_extrapolating_different_models_is_refused():
    with pytest.raises(ValueError, match="shape"):
        extrapolate(random_gpt(0), random_gpt(0, dim=128), 1.5)
    with pytest.raises(ValueError, match="keys"):
        extrapolate(random_gpt(0), random_gpt(0, n_layer=3), 1.5)
    with pytest.raises(ValueError, match="finite"):
        extrapolate(random_gpt(0), random_gpt(1), float("nan"))


def test_train_extrapolate_command(tmp_path, capsys):
    save_pretrained(random_gpt(0), tmp_path / "ref")
    save_pretrained(random_gpt(1), tmp_path / "tuned", extra={"train": {"lam": 30.0}, "step": 7})
    assert main(["train", "extrapolate", "--ref", str(tmp_path / "ref"), "--tuned", str(tmp_path / "tuned"),
                 "--alpha", "1.5", "--out", str(tmp_path / "out")]) == 0
    out = load_gpt(tmp_path / "out").state_dict()
    expected = extrapolate(load_gpt(tmp_path / "ref"), load_gpt(tmp_path / "tuned"), 1.5).state_dict()
    assert all(torch.equal(out[k], v) for k, v in expected.items())
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["train"] == {"lam": 30.0} and meta["step"] == 7 and meta["extrapolation"]["alpha"] == 1.5
    save_pretrained(random_gpt(1, n_layer=3), tmp_path / "other")
    with pytest.raises(SystemExit, match="different models"):
        main(["train", "extrapolate", "--ref", str(tmp_path / "ref"), "--tuned", str(tmp_path / "other"),
              "--alpha", "1.5", "--out", str(tmp_path / "bad")])
