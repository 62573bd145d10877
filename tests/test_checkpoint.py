"""Every LlamaGen/CCA checkpoint layout loads; bad files give clear errors; pickles run nothing."""
import argparse
import os
import pickle

import pytest
import torch

import samplers.gpt as gpt_module
from cli import main as cli_main
from samplers import CheckpointError, build_gpt, build_vq, load_gpt, load_vq, read_checkpoint
from tests.conftest import TINY_GPT, TINY_VQ, random_gpt


@pytest.fixture
def tiny_preset(monkeypatch):
    """A tiny entry in the preset table, so preset inference is tested without GPT-B's 450 MB."""
    monkeypatch.setitem(gpt_module.GPT_PRESETS, "GPT-T", {"n_layer": 2, "n_head": 4, "dim": 64})
    monkeypatch.setitem(gpt_module.GPT_PRESETS, "GPT-T2", {"n_layer": 3, "n_head": 4, "dim": 64})
    return "GPT-T"


def _llamagen_state(gpt):
    state = dict(gpt.state_dict())
    state["freqs_cis"] = torch.zeros(17, 8, 2)  # older checkpoints carry it; it is not a weight
    return state


LAYOUTS = {
    "ddp": lambda s: {"model": s, "optimizer": {}, "steps": 10, "args": argparse.Namespace(gpt_model="GPT-T")},
    "deepspeed": lambda s: {"module": s},
    "state_dict": lambda s: {"state_dict": s},
    "fsdp": lambda s: s,
    "compiled": lambda s: {"model": {f"_orig_mod.{k}": v for k, v in s.items()}},
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_layout_loads_the_same_weights(tmp_path, tiny_preset, layout):
    gpt = random_gpt(0, vocab_size=64)
    path = tmp_path / f"c2i_T_{layout}.pt"
    torch.save(LAYOUTS[layout](_llamagen_state(gpt)), path)
    loaded = load_gpt(path, image_size=64)  # 64 px / 16 = 4x4 tokens; preset inferred from shapes
    assert loaded.config.n_layer == 2 and loaded.config.block_size == 16 and loaded.config.num_classes == 10
    for k, v in gpt.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": {"w": Evil()}}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_gpt(path)
    assert not marker.exists()
    # same through torch.save's zip format
    path2 = tmp_path / "evil2.pt"
    torch.save({"model": Evil()}, path2)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path2)
    assert not marker.exists()


def test_wrong_preset_names_the_mismatch_and_the_preset_that_fits(tmp_path, tiny_preset):
    path = tmp_path / "c2i.pt"
    torch.save({"model": random_gpt(0).state_dict()}, path)
    with pytest.raises(CheckpointError) as err:
        load_gpt(path, preset="GPT-T2", image_size=64)
    msg = str(err.value)
    assert "missing key(s)" in msg and "layers.2" in msg and "GPT-T" in msg
    expected = r"shape mismatch.*wqkv.weight: checkpoint \[192, 64\], model \[2304, 768\].*fit preset\(s\) \['GPT-T'\]"
    with pytest.raises(CheckpointError, match=expected):
        load_gpt(path, preset="GPT-B", image_size=64)


def test_unknown_shapes_and_missing_keys(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"model": random_gpt(0, dim=96, n_head=4).state_dict()}, path)
    with pytest.raises(CheckpointError, match="no preset has dim=96"):
        load_gpt(path)
    state = random_gpt(0).state_dict()
    del state["norm.weight"]
    torch.save({"model": state}, tmp_path / "broken.pt")
    with pytest.raises(CheckpointError, match="missing key.*norm.weight"):
        load_gpt(tmp_path / "broken.pt", preset="GPT-B")  # GPT-B also mismatches shapes: both named
    with pytest.raises(CheckpointError, match="no weights"):
        torch.save({"optimizer": {"lr": 1.0}}, tmp_path / "opt.pt")
        load_gpt(tmp_path / "opt.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_gpt(tmp_path / "junk.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        load_gpt(tmp_path / "absent.pt")


def test_gpt_and_vq_files_are_told_apart(tmp_path):
    torch.save({"model": build_vq(TINY_VQ).state_dict()}, tmp_path / "vq.pt")
    torch.save({"model": build_gpt(TINY_GPT).state_dict()}, tmp_path / "gpt.pt")
    with pytest.raises(CheckpointError, match="VQ tokenizer checkpoint, not a GPT"):
        load_gpt(tmp_path / "vq.pt")
    with pytest.raises(CheckpointError, match="GPT checkpoint, not a VQ"):
        load_vq(tmp_path / "gpt.pt")


def test_vq_config_is_inferred_from_shapes_and_round_trips(tmp_path, tiny_vq):
    torch.save({"model": tiny_vq.state_dict()}, tmp_path / "vq_tiny.pt")
    loaded = load_vq(tmp_path / "vq_tiny.pt")
    assert loaded.config.encoder_ch_mult == [1, 2] and loaded.config.ch == 32
    codes = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded.decode_code(codes, (4, 4)), tiny_vq.decode_code(codes, (4, 4)))


def test_convert_cli_writes_safetensors_that_load_identically(tmp_path, tiny_preset, tiny_vq):
    gpt = random_gpt(1)
    torch.save({"model": _llamagen_state(gpt)}, tmp_path / "c2i_T_256.pt")
    assert cli_main(["convert", str(tmp_path / "c2i_T_256.pt"), str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists() and (tmp_path / "out" / "config.json").exists()
    again = load_gpt(tmp_path / "out")
    assert again.config.block_size == 256  # from the file name
    for k, v in gpt.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)
    torch.save({"model": tiny_vq.state_dict()}, tmp_path / "vq.pt")
    assert cli_main(["convert", str(tmp_path / "vq.pt"), str(tmp_path / "vq_out")]) == 0
    assert load_vq(tmp_path / "vq_out").config == tiny_vq.config
    assert cli_main(["convert", str(tmp_path / "missing.pt"), str(tmp_path / "x")]) == 2


def test_loading_builds_on_meta_and_never_runs_the_initialiser(tmp_path, tiny_preset, tiny_vq, monkeypatch):
    """gpt-fast style loading: no random init before the checkpoint, weights adopted (assign=True)."""
    from samplers import save_pretrained

    gpt = random_gpt(0, vocab_size=64)
    torch.save({"model": gpt.state_dict()}, tmp_path / "gpt.pt")
    save_pretrained(gpt, tmp_path / "gpt_dir")
    save_pretrained(tiny_vq, tmp_path / "vq_dir")
    x = torch.randint(0, 64, (2, 5))
    expected = gpt(torch.tensor([1, 2]), x)

    def refuse(*args, **kwargs):  # modules' default init may run on meta tensors: it touches no memory
        if any(isinstance(a, torch.Tensor) and not a.is_meta for a in args):
            raise AssertionError("an initialiser ran on real memory while loading a checkpoint")
        return args[0]

    def refuse_init_weights(self, *args, **kwargs):
        raise AssertionError("GPT.init_weights ran while loading a checkpoint")

    for name in ("normal_", "uniform_", "zeros_", "kaiming_uniform_"):
        monkeypatch.setattr(torch.nn.init, name, refuse)
    monkeypatch.setattr(gpt_module.GPT, "init_weights", refuse_init_weights)
    for path, preset in ((tmp_path / "gpt.pt", tiny_preset), (tmp_path / "gpt_dir", None)):
        loaded = load_gpt(path, preset, image_size=64) if preset else load_gpt(path)
        assert all(not t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
        torch.testing.assert_close(loaded(torch.tensor([1, 2]), x), expected, rtol=0, atol=0)
    vq = load_vq(tmp_path / "vq_dir")
    assert all(not t.is_meta for t in [*vq.parameters(), *vq.buffers()])
    codes = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(vq.decode_code(codes, (4, 4)), tiny_vq.decode_code(codes, (4, 4)))
