"""VAR, the second family: parity with VAR's own code (golden files), cached decoding equal to full
recomputation, one row per unguided image, batch-invariant seeds, every checkpoint layout."""
import pickle

import pytest
import torch

import samplers
from samplers import CheckpointError, build_var, build_var_vae, load_var, load_var_vae, save_pretrained
from samplers.checkpoint import infer_var_config
from samplers.generate import run_decoder, seed_keys
from samplers.modes import SamplingOptions
from samplers.var import VAR, VARConfig, VARDecoder, scale_guidance
from samplers.var_vae import phi_index_per_scale

STARTS = [0, 1, 5, 14, 30]


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # VAR's golden tensors were made with one thread (conv kernels differ by ~3e-6)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(one_thread):
    from tests.conftest import GOLDEN

    vae = load_var_vae(GOLDEN / "var_tiny_vae.pt")
    var = load_var(GOLDEN / "var_tiny_var.pt", vae)
    return vae, var, torch.load(GOLDEN / "var_tiny_expected.pt", weights_only=True)


def test_phi_table_matches_var():
    assert phi_index_per_scale(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_index_per_scale(5, 4) == [0, 1, 2, 2, 3]


def test_vae_matches_var_exactly(tiny):
    vae, _, e = tiny
    image = e["image_u8"].float() / 127.5 - 1
    idx = vae.img_to_idx(image)
    assert [i.shape for i in idx] == [(2, p * p) for p in (1, 2, 3, 4, 5)]
    assert all(torch.equal(a, b) for a, b in zip(idx, e["gt_idx_Bl"], strict=True))
    torch.testing.assert_close(vae.idx_to_var_input(idx), e["x_BLCv_wo_first_l"], rtol=0, atol=1e-5)
    torch.testing.assert_close(vae.decode_code(e["gt_BL"]), e["decoded_img"], rtol=0, atol=2e-5)


def test_teacher_forced_logits_match_var(tiny):
    _, var, e = tiny
    with torch.no_grad():
        logits = var(e["tf_labels"], e["x_BLCv_wo_first_l"])
    torch.testing.assert_close(logits, e["tf_logits"], rtol=0, atol=3e-5)
    seq = logits.log_softmax(-1).gather(2, e["gt_BL"][..., None]).squeeze(2).sum(-1)
    torch.testing.assert_close(seq, e["tf_seq_logp"], rtol=0, atol=1e-3)


@pytest.mark.parametrize("var_cfg", [0.0, 4.0])
def test_cached_guided_logits_match_var_sampling(tiny, var_cfg):
    """Our decoder, fed the tokens VAR sampled, computes the guided logits VAR sampled them from
    (VAR's cfg c is our cfg_scale 1 + c, ramped over the scales)."""
    vae, var, e = tiny
    forced = e[f"ar_tokens_cfg{int(var_cfg)}"]
    keys = seed_keys([0, 1]).tolist()
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def replay(logits, key, first, options):
        row = keys.index(key)
        seen[row].append(logits.clone())
        return forced[row, first:first + len(logits)]

    decoder = VARDecoder(var, 4)
    decoder.sample_fn = replay
    jobs = run_decoder(decoder, [1, 3], [0, 1], SamplingOptions(cfg_scale=1.0 + var_cfg, top_k=16, top_p=0.9))
    assert [j.tokens for j in jobs] == forced.tolist()
    got = torch.stack([torch.cat(seen[r]) for r in (0, 1)])
    torch.testing.assert_close(got, e[f"ar_logits_cfg{int(var_cfg)}"], rtol=1e-4, atol=1e-4)
    if var_cfg == 4.0:
        images = vae.decode_code(torch.tensor([j.tokens for j in jobs]))
        torch.testing.assert_close((images + 1) / 2, e["ar_img_cfg4"], rtol=0, atol=2e-5)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0, 5.0])
def test_greedy_cached_decoding_equals_full_recomputation(tiny, cfg_scale):
    vae, var, _ = tiny
    classes = torch.tensor([1, 3])
    tokens = samplers.generate(var, classes, cfg_scale=cfg_scale, top_k=1, seeds=[0, 1])
    assert tokens.shape == (2, 55)
    x = vae.idx_to_var_input(vae.split_scales(tokens))
    with torch.no_grad():
        cond = var(classes, x)
        uncond = var(torch.full_like(classes, 10), x)
    for k, start in enumerate(STARTS):
        end = start + (k + 1) ** 2
        s = scale_guidance(cfg_scale, k, 5, "linear")
        guided = s * cond[:, start:end] - (s - 1) * uncond[:, start:end]
        assert torch.equal(guided.argmax(-1), tokens[:, start:end]), k


def test_unguided_modes_run_one_row_per_image(tiny):
    _, var, _ = tiny
    for scale, rows in ((1.0, 3), (3.0, 6)):
        decoder = VARDecoder(var, 8)
        run_decoder(decoder, [1, 2, 3], [4, 5, 6], SamplingOptions(cfg_scale=scale, top_k=8))
        assert list(decoder.rows_log) == [rows] * 5


def test_a_finished_decoder_frees_its_kv_cache_without_the_cycle_collector(tiny):
    """An evaluation decodes thousands of batches, each with a new decoder; a reference cycle kept
    every decoder's KV cache alive until the cycle collector ran, and the process ran out of memory."""
    import gc
    import weakref

    _, var, _ = tiny
    gc.disable()
    try:
        decoder = VARDecoder(var, 4)
        run_decoder(decoder, [1, 2], [3, 4], SamplingOptions(cfg_scale=3.0, top_k=8))
        cache = weakref.ref(decoder.k_cache[0])
        del decoder
        assert cache() is None
    finally:
        gc.enable()


def test_seeded_images_do_not_depend_on_the_batch(tiny):
    vae, var, _ = tiny
    opts = {"cfg_scale": 3.0, "top_k": 20, "top_p": 0.9}
    batch = samplers.generate(var, [1, 3, 5], seeds=[7, 8, 9], **opts)
    alone = samplers.generate(var, [3], seeds=[8], **opts)
    assert torch.equal(batch[1], alone[0])
    assert not torch.equal(batch[0], batch[2])
    assert torch.equal(vae.decode_code(batch[1:2]), vae.decode_code(alone))
    # an engine-like decoder where images join at different scales gives the same tokens too
    decoder = VARDecoder(var, 8)
    first = decoder.add(1, 7, SamplingOptions(**opts))
    decoder.step()
    decoder.step()
    late = decoder.add(3, 8, SamplingOptions(**opts))
    while decoder.jobs:
        decoder.step()
    assert first.tokens == batch[0].tolist() and late.tokens == batch[1].tolist()
    smooth = samplers.generate(var, [3], seeds=[8], more_smooth=True, **opts)
    assert torch.equal(smooth, samplers.generate(var, [3], seeds=[8], more_smooth=True, **opts))


def test_constant_schedule_and_bad_options(tiny):
    _, var, _ = tiny
    ramp = samplers.generate(var, [2], seeds=[1], cfg_scale=4.0, top_k=1)
    flat = samplers.generate(var, [2], seeds=[1], cfg_scale=4.0, top_k=1, cfg_schedule="constant")
    assert not torch.equal(ramp, flat)
    with pytest.raises(ValueError, match="cfg_interval"):
        samplers.generate(var, [2], cfg_interval=3, cfg_scale=2.0)


def test_every_checkpoint_layout_loads(tiny, tmp_path):
    vae, var, e = tiny
    state = {k: v.clone() for k, v in var.state_dict().items()}
    layouts = {"top.pth": state, "var_trainer.pth": {"trainer": {"var_wo_ddp": state, "vae_local": {}}},
               "cca_trainer.pth": {"trainer": state, "epoch": 1}}
    with torch.no_grad():
        expected = var(e["tf_labels"], e["x_BLCv_wo_first_l"])
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / name)
        loaded = load_var(tmp_path / name, vae)
        with torch.no_grad():
            got = loaded(e["tf_labels"], e["x_BLCv_wo_first_l"])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=name)
    save_pretrained(var, tmp_path / "var_dir")
    save_pretrained(vae, tmp_path / "vae_dir")
    vae2 = load_var_vae(tmp_path / "vae_dir")
    var2 = load_var(tmp_path / "var_dir", vae2)
    with torch.no_grad():
        torch.testing.assert_close(var2(e["tf_labels"], e["x_BLCv_wo_first_l"]), expected, rtol=0, atol=1e-5)
    with pytest.raises(CheckpointError, match="12 blocks|depth 12"):
        load_var(tmp_path / "top.pth", vae, depth=12)
    with pytest.raises(CheckpointError, match="not a VAR transformer"):
        load_var(tmp_path / "vae_dir", vae)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_malicious_var_pickle_is_refused(tmp_path, tiny, capsys):
    vae, _, _ = tiny
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"trainer": {"var_wo_ddp": _Evil()}}, f)
    with pytest.raises(CheckpointError, match="refused"):
        load_var(tmp_path / "evil.pth", vae)
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("depth", [16, 20, 24, 30])
def test_depth_inferred_from_shapes(depth):
    with torch.device("meta"):  # shapes only: d30 is 2B parameters
        vae = build_var_vae()
        model = VAR(VARConfig.from_depth(depth))
    config = infer_var_config(dict(model.state_dict()), vae)
    assert (config.depth, config.embed_dim, config.num_heads, config.block_size) == (depth, 64 * depth, depth, 680)


def test_custom_small_var_builds_and_samples():
    torch.manual_seed(0)
    vae = build_var_vae(ch=32, ch_mult=[1, 1, 2], num_res_blocks=1, vocab_size=128, z_channels=8, patch_nums=[1, 2, 4])
    var = build_var({"depth": 2, "embed_dim": 64, "num_heads": 2, "num_classes": 5, "vocab_size": 128,
                     "z_channels": 8, "patch_nums": [1, 2, 4]}, vae)
    tokens = samplers.generate(var, [0, 4], seeds=[1, 2], cfg_scale=2.0)
    assert tokens.shape == (2, 21) and vae.decode_code(tokens).shape == (2, 3, 16, 16)


def filter_var_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """VAR's rules on [N, V]: top-k keeps logits >= the k-th largest; top-p (1 = off here; VAR's 0)
    sorts ascending and drops the tokens whose cumulative probability stays <= 1 - top_p, never the
    most likely one."""
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[:, -1] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), -torch.inf)
    return logits


def test_sampling_follows_vars_top_k_top_p_rules():
    """Sampled tokens come from exactly the set VAR's rules keep, in proportion to their probability."""
    from samplers.var import sample_scale

    torch.manual_seed(0)
    logits = torch.randn(1, 50) * 0.7
    allowed = torch.isfinite(filter_var_logits(logits.clone(), 10, 0.7))[0]
    probs = torch.softmax(filter_var_logits(logits.clone(), 10, 0.7), dim=-1)[0]
    draws = torch.cat([sample_scale(logits.expand(500, -1), key, 500 * key, SamplingOptions(top_k=10, top_p=0.7))
                       for key in range(40)])
    counts = torch.bincount(draws, minlength=50).float() / len(draws)
    assert allowed[draws].all() and 1 < int(allowed.sum()) <= 10
    assert (counts - probs).abs().max() < 0.02


def test_compiled_step_gives_the_same_tokens(tiny):
    """compile=True (meant for CUDA) runs each scale's trunk under torch.compile with static shapes."""
    _, var, _ = tiny
    opts = SamplingOptions(cfg_scale=3.0, top_k=1)
    eager = VARDecoder(var, 4)
    compiled = VARDecoder(var, 4, compile=True)
    a = run_decoder(eager, [1, 3], [0, 1], opts)
    b = run_decoder(compiled, [1, 3], [0, 1], opts)
    assert [j.tokens for j in a] == [j.tokens for j in b]
