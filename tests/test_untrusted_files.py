"""Untrusted weights and configs fail with one line naming the file, before anything is allocated."""
import json
import struct

import pytest
import torch

from cli import main as cli_main
from samplers import CheckpointError, load_gpt, load_vq, save_pretrained
from tests.conftest import random_gpt


@pytest.fixture
def gpt_dir(tmp_path):
    return save_pretrained(random_gpt(0), tmp_path / "gpt")


def _edit_config(folder, **changes):
    meta = json.loads((folder / "config.json").read_text())
    meta["config"].update(changes)
    (folder / "config.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("field,value", [
    ("n_layer", 10**6), ("block_size", 10**8), ("dim", 10**7), ("vocab_size", 10**9), ("num_classes", 10**9),
    ("dim", -192), ("dim", "192"), ("n_head", 0), ("rope_base", float("nan")), ("block_size", 17),
])
def test_bad_config_fails_before_building(gpt_dir, field, value):
    _edit_config(gpt_dir, **{field: value})
    with pytest.raises(CheckpointError) as err:
        load_gpt(gpt_dir)
    message = str(err.value)
    assert str(gpt_dir) in message and "\n" not in message
    assert field in message or "square" in message


def test_config_that_does_not_fit_the_weights(gpt_dir):
    _edit_config(gpt_dir, n_layer=4)  # within bounds, but the file holds 2 layers
    with pytest.raises(CheckpointError, match="n_layer 4 vs 2 layers"):
        load_gpt(gpt_dir)
    (gpt_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not a readable JSON config"):
        load_gpt(gpt_dir)
    (gpt_dir / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="expected a JSON object"):
        load_gpt(gpt_dir)


def test_vq_config_is_checked_too(tmp_path, tiny_vq):
    folder = save_pretrained(tiny_vq, tmp_path / "vq")
    _edit_config(folder, ch=10**6)
    with pytest.raises(CheckpointError, match="'ch' must be an integer"):
        load_vq(folder)
    _edit_config(folder, ch=32, codebook_size=4096)
    with pytest.raises(CheckpointError, match="codebook 4096 x 8"):
        load_vq(folder)


def test_broken_safetensors(gpt_dir):
    weights = gpt_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_gpt(gpt_dir)
    weights.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_gpt(gpt_dir)
    # a header that claims 2**40 bytes of header, and one that claims a tensor far bigger than the file
    weights.write_bytes(struct.pack("<Q", 2**40) + b"{}")
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_gpt(gpt_dir)
    header = json.dumps({"tok_embeddings.weight": {"dtype": "F32", "shape": [10**6, 10**6],
                                                   "data_offsets": [0, 4 * 10**12]}}).encode()
    weights.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 64)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_gpt(gpt_dir)


def test_empty_and_garbage_pickles(tmp_path):
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.pt: not a readable PyTorch checkpoint"):
        load_gpt(empty)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x04garbage")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_gpt(garbage)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a dict of tensors"):
        load_gpt(tmp_path / "list.pt")


def test_cli_prints_one_line_not_a_traceback(gpt_dir, tmp_path, capsys):
    _edit_config(gpt_dir, dim="192")
    assert cli_main(["convert", str(gpt_dir), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
