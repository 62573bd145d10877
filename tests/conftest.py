import os
from pathlib import Path

import pytest
import torch

from samplers import build_gpt, build_vq

ROOT = Path(__file__).resolve().parent.parent
# Outputs of the reference code (LlamaGen, VAR, the CCA formula), kept in the repository so the suite
# never skips; test_golden_files_are_in_sync checks them against the team's shared copy when present.
GOLDEN = Path(os.environ.get("CCASERVE_GOLDEN", ROOT / "tests" / "golden"))
SHARED_GOLDEN = ROOT.parent / "shared" / "golden"

TINY_GPT = {"dim": 64, "n_layer": 2, "n_head": 4, "vocab_size": 64, "num_classes": 10, "block_size": 16,
            "multiple_of": 64, "token_dropout_p": 0.0, "resid_dropout_p": 0.0, "ffn_dropout_p": 0.0}
TINY_VQ = {"codebook_size": 64, "codebook_embed_dim": 8, "ch": 32, "encoder_ch_mult": [1, 2],
           "decoder_ch_mult": [1, 2], "z_channels": 32, "num_res_blocks": 1}


def random_gpt(seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    gpt = build_gpt({**TINY_GPT, **overrides})
    for p in gpt.parameters():  # larger than LlamaGen's init so logits are far from uniform
        torch.nn.init.normal_(p, std=0.3)
    return gpt.eval()


@pytest.fixture
def tiny_gpt():
    return random_gpt(0)


@pytest.fixture
def tiny_vq():
    torch.manual_seed(0)
    return build_vq(TINY_VQ).eval()


@pytest.fixture
def golden():
    assert GOLDEN.is_dir(), f"golden files missing at {GOLDEN}: they ship in tests/golden/"
    return GOLDEN
