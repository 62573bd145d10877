"""Real checkpoints get the paper's CCA settings by preset (Table 4), printed at start."""
import pytest
import torch

from cli import build_parser
from cli.train import _preset_of, cca_args_from
from samplers.gpt import GPT, GPTConfig
from training.recipes import cca_recipe


def _meta_gpt(preset: str) -> GPT:
    with torch.device("meta"):  # shapes only: no memory for GPT-L's 343M parameters
        return GPT(GPTConfig.from_preset(preset), init=False)


def _args(*extra: str):
    return build_parser().parse_args(["train", "cca", "--ref", "r", "--codes", "c", "--out", "o", *extra])


def test_gpt_l_gets_its_table_4_row():
    gpt_l = _meta_gpt("GPT-L")
    assert _preset_of(gpt_l) == "GPT-L"
    args, line = cca_args_from(_args(), gpt_l)
    got = (args.loss, args.lam, args.beta, args.lr, args.batch_size, args.dropout, args.epochs, args.uncond_ratio)
    assert got == ("cca", 300.0, 0.02, 1e-5, 256, True, 1.0, 0.1)
    assert "Table 4 row for GPT-L" in line and "lam=300" in line and "beta=0.02" in line and "lr=1e-05" in line
    cfg, line = cca_args_from(_args("--target", "cca+cfg"), gpt_l)
    assert (cfg.lam, cfg.beta) == (1.0, 0.02)  # GPT-L's CCA+CFG row; the others use beta 0.1
    assert (cca_recipe("paper", "GPT-B", "cca+cfg")["lam"], cca_recipe("paper", "GPT-B", "cca+cfg")["beta"]) == (1, 0.1)


@pytest.mark.parametrize("preset,lam", [("GPT-B", 1000), ("GPT-XL", 1000), ("GPT-XXL", 1000), ("GPT-3B", 500)])
def test_every_llamagen_row(preset, lam):
    args, _ = cca_args_from(_args(), _meta_gpt(preset))
    assert (args.lam, args.beta, args.lr, args.batch_size) == (lam, 0.02, 1e-5, 256)


def test_authors_code_and_flags_override_and_toy_for_the_rest(tiny_gpt):
    args, line = cca_args_from(_args("--recipe", "authors-code", "--lambda", "50"), _meta_gpt("GPT-B"))
    assert (args.lr_schedule, args.weight_decay, args.accumulate, args.lam) == ("constant", 0.05, "sum", 50.0)
    assert "set by flags: lam" in line
    toy, line = cca_args_from(_args(), tiny_gpt)  # not a LlamaGen preset: the default model's recipe
    assert (toy.lam, toy.beta, toy.batch_size, toy.dropout) == (10.0, 0.1, 32, False) and "toy" in line
    assert toy.negatives_within is None  # plain rolled labels, unless asked
    hard, line = cca_args_from(_args("--negatives-within", "colour"), tiny_gpt)
    assert hard.negatives_within == "colour" and "negatives_within=colour" in line


def test_constant_schedule_is_constant():
    from training.trainers import Schedule

    constant = Schedule(100, 1e-5, warmup=0, min_lr_ratio=1.0)
    assert {constant(k) for k in range(100)} == {1e-5}


@pytest.mark.parametrize("depth,lam,dropout", [(16, 50, False), (20, 50, True), (24, 100, True), (30, 1000, True)])
def test_var_presets_get_their_table_4_column(depth, lam, dropout):
    from samplers.var import VAR, VARConfig

    with torch.device("meta"):
        var = VAR(VARConfig.from_depth(depth))
    assert _preset_of(var) == f"VAR-d{depth}"
    args, line = cca_args_from(_args(), var)
    assert (args.lam, args.beta, args.lr, args.batch_size, args.dropout) == (lam, 0.02, 2e-5, 256, dropout)
    assert f"Table 4 row for VAR-d{depth}" in line
