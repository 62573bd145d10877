"""The pipeline object and the `ccaserve sample` command on small models."""
import numpy as np
import pytest
import torch
from PIL import Image

from cli import main as cli_main
from samplers import Pipeline, normalize_mode
from tests.conftest import random_gpt


@pytest.fixture
def pipe(tiny_vq):
    return Pipeline(random_gpt(0), tiny_vq, random_gpt(1), name="tiny", default_cfg_scale=3.0)


def test_mode_names():
    assert normalize_mode("cca_cfg") == normalize_mode("cca cfg") == normalize_mode("CCA+CFG") == "cca+cfg"
    with pytest.raises(ValueError, match="unknown mode"):
        normalize_mode("dpo")


def test_four_modes_side_by_side_with_costs(pipe):
    results = pipe.compare(3, seed=7)
    assert list(results) == ["free", "cfg", "cca", "cca+cfg"]
    n = pipe.gpt.config.block_size
    assert {m: r.rows_x_steps for m, r in results.items()} == {"free": n, "cfg": 2 * n, "cca": n, "cca+cfg": 2 * n}
    assert results["cfg"].options.cfg_scale == 3.0 and results["free"].options.cfg_scale == 1.0
    for r in results.values():
        assert isinstance(r.image, Image.Image) and r.image.size == (8, 8)  # 4x4 tokens, 2x upsampling
        assert r.latency_s >= r.gpt_s > 0 and r.seed == 7
    # free and cca use different weights; free and cfg differ by guidance
    assert results["free"].tokens != results["cca"].tokens
    assert results["free"].tokens != results["cfg"].tokens


def test_cca_cfg_mode_guides_its_own_fine_tune_when_there_is_one(tiny_vq):
    from samplers import generate

    base, cca, cca_cfg = random_gpt(0), random_gpt(1), random_gpt(2)
    pipe = Pipeline(base, tiny_vq, cca, default_cfg_scale=3.0, cca_cfg_gpt=cca_cfg)
    assert pipe.model_for("cca") is cca and pipe.model_for("cca+cfg") is cca_cfg and pipe.model_for("cfg") is base
    got = pipe([4], "cca+cfg", [9])[0].tokens
    assert got == generate(cca_cfg, [4], cfg_scale=3.0, seeds=[9])[0].tolist()
    assert got != generate(cca, [4], cfg_scale=3.0, seeds=[9])[0].tolist()
    # without a separate one, cca+cfg guides the CCA model
    assert Pipeline(base, tiny_vq, cca).model_for("cca+cfg") is cca
    with pytest.raises(ValueError, match="needs the guidance-free CCA model"):
        Pipeline(base, tiny_vq, None, cca_cfg_gpt=cca_cfg)


def test_each_guided_mode_has_its_own_default_scale(tiny_vq):
    pipe = Pipeline(random_gpt(0), tiny_vq, random_gpt(1), default_cfg_scale=3.0, default_cca_cfg_scale=1.5)
    assert [pipe.default_scale(m) for m in ("free", "cfg", "cca", "cca_cfg")] == [1.0, 3.0, 1.0, 1.5]
    results = pipe.compare(3, seed=7)
    assert {m: r.options.cfg_scale for m, r in results.items()} == {"free": 1.0, "cfg": 3.0, "cca": 1.0,
                                                                     "cca+cfg": 1.5}
    assert pipe.options_for("cca+cfg", cfg_scale=2.0).cfg_scale == 2.0  # a request's scale wins
    # one scale for both when the model names no cca+cfg scale
    assert Pipeline(random_gpt(0), tiny_vq, random_gpt(1), default_cfg_scale=3.0).default_scale("cca+cfg") == 3.0


def test_pipeline_images_match_generate_and_decode(pipe):
    from samplers import generate

    res = pipe([1, 2], "cfg", [5, 6], cfg_scale=2.0, top_k=10)
    tokens = generate(pipe.gpt, [1, 2], cfg_scale=2.0, top_k=10, seeds=[5, 6])
    assert [r.tokens for r in res] == tokens.tolist()
    with torch.no_grad():
        images = pipe.vq.decode_code(tokens, (4, 4))
    assert images.min() >= -1 and images.max() <= 1
    assert res[0].image.tobytes() == pipe.decode(tokens[:1])[0].tobytes()


def test_pipeline_errors(pipe, tiny_vq):
    with pytest.raises(ValueError, match="class id 10 out of range"):
        pipe([10], "free")  # the null class is not a user class
    with pytest.raises(ValueError, match="needs a CCA model"):
        Pipeline(random_gpt(0), tiny_vq)([1], "cca")
    with pytest.raises(ValueError, match="temperature"):
        pipe([1], "free", temperature=-1.0)


def test_cli_sample_writes_a_labelled_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    code = cli_main(["sample", "--class", "207,3", "--modes", "free,cfg,cca,cca_cfg", "--seed", "0",
                     "--out", str(out), "--quiet", "--model", "tiny-random"])
    assert code == 0
    printed = capsys.readouterr().out
    for mode in ("free", "cfg", "cca", "cca+cfg"):
        assert mode in printed
    grid = Image.open(out)
    assert grid.width > 4 * 160 and grid.height > 2 * 160


def test_cli_sample_tiles_several_seeds_per_cell(tmp_path):
    """--seeds 4: each class x mode cell is a 2x2 block of the images of four seeds, the same
    images the pipeline gives for those seeds."""
    from samplers import Pipeline

    out = tmp_path / "grid.png"
    assert cli_main(["sample", "--class", "207,3", "--modes", "free,cca", "--seeds", "4", "--seed", "10",
                     "--out", str(out), "--quiet", "--model", "tiny-random"]) == 0
    grid = Image.open(out).convert("RGB")
    pipe = Pipeline.from_registry("tiny-random")
    side = pipe.image_size  # 64 px: a 2x2 block is 128, shown in a 160-px cell (nearest-neighbour)
    expected = pipe([3] * 4, "cca", [14, 15, 16, 17])  # class 3 is the second row: seeds 14-17
    cell, head, left, pad = 160, 34, 120, 4
    block = grid.crop((left + cell + pad, head + cell + pad, left + 2 * cell + pad, head + 2 * cell + pad))
    block = block.resize((2 * side, 2 * side), Image.NEAREST)
    for j, r in enumerate(expected):
        tile = block.crop(((j % 2) * side, (j // 2) * side, (j % 2 + 1) * side, (j // 2 + 1) * side))
        diff = np.abs(np.asarray(tile, dtype=int) - np.asarray(r.image.convert("RGB"), dtype=int))
        assert diff.mean() < 8, j  # resampled twice, so not bit-equal; another seed differs far more
    with pytest.raises(SystemExit, match="--seeds"):
        cli_main(["sample", "--seeds", "0", "--out", str(out), "--quiet", "--model", "tiny-random"])


def test_cli_reports_bad_input(tmp_path, capsys):
    assert cli_main(["sample", "--class", "5000", "--out", str(tmp_path / "g.png"), "--quiet"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert cli_main(["sample", "--model", "nope", "--out", str(tmp_path / "g.png")]) == 2
