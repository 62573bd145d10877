"""CFG on a doubled batch equals separate passes; a seed reproduces its image anywhere."""
import pytest
import torch

from samplers import Decoder, SamplingOptions, generate
from samplers.generate import guided_logits, sample_from_logits, seed_keys, uniform_noise


def _replay_with_separate_passes(gpt, class_id, seed, opts):
    """Sample token by token from teacher-forced cond and uncond passes run separately."""
    null = gpt.config.null_class
    tokens = torch.zeros(1, 0, dtype=torch.long)
    key = seed_keys([seed])
    for i in range(gpt.config.block_size):
        with torch.no_grad():
            cond = gpt(torch.tensor([class_id]), tokens)[:, -1]
            uncond = gpt(torch.tensor([null]), tokens)[:, -1]
        logits = guided_logits(cond, uncond, torch.tensor([opts.cfg_scale])) if opts.guides_token(i) else cond
        tok = sample_from_logits(logits, uniform_noise(key, i), torch.tensor([opts.temperature]),
                                 torch.tensor([opts.top_k]), torch.tensor([opts.top_p]))
        tokens = torch.cat([tokens, tok[:, None]], dim=1)
    return tokens[0]


@pytest.mark.parametrize("opts", [
    SamplingOptions(cfg_scale=3.0),
    SamplingOptions(cfg_scale=2.0, top_k=8, temperature=0.9),
    SamplingOptions(cfg_scale=5.0, top_p=0.8),
    SamplingOptions(cfg_scale=3.0, cfg_interval=4),
    SamplingOptions(cfg_scale=0.5),
])
def test_cfg_doubled_batch_equals_separate_passes(tiny_gpt, opts):
    got = generate(tiny_gpt, [2, 5], seeds=[11, 12], cfg_scale=opts.cfg_scale, cfg_interval=opts.cfg_interval,
                   temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p)
    for row, (c, s) in enumerate([(2, 11), (5, 12)]):
        assert torch.equal(got[row], _replay_with_separate_passes(tiny_gpt, c, s, opts))


def test_guidance_changes_the_image(tiny_gpt):
    free = generate(tiny_gpt, [2], seeds=[3])
    guided = generate(tiny_gpt, [2], seeds=[3], cfg_scale=4.0)
    assert not torch.equal(free, guided)


def test_seed_reproduces_image_alone_and_in_a_mixed_batch(tiny_gpt):
    alone = generate(tiny_gpt, [4], seeds=[42], cfg_scale=3.0, top_k=20)
    again = generate(tiny_gpt, [4], seeds=[42], cfg_scale=3.0, top_k=20)
    batch = generate(tiny_gpt, [0, 9, 4, 4, 1], seeds=[1, 2, 42, 43, 5], cfg_scale=3.0, top_k=20)
    assert torch.equal(alone, again)
    assert torch.equal(batch[2], alone[0])
    assert not torch.equal(batch[3], alone[0])  # same class, other seed


def test_images_with_different_options_share_one_decoder(tiny_gpt):
    """Free and guided images (1 and 2 rows), joining at different steps, each give what they give
    alone: the server's continuous batching rests on this."""
    specs = [(3, 7, SamplingOptions()), (3, 7, SamplingOptions(cfg_scale=4.0)),
             (8, 1, SamplingOptions(cfg_scale=2.0, cfg_interval=2, top_p=0.9)), (1, 9, SamplingOptions(top_k=5))]
    alone = [generate(tiny_gpt, [c], seeds=[s], cfg_scale=o.cfg_scale, cfg_interval=o.cfg_interval,
                      top_k=o.top_k, top_p=o.top_p)[0].tolist() for c, s, o in specs]
    decoder = Decoder(tiny_gpt, max_rows=6)
    jobs, done = [], []
    for step in range(40):
        if step in (0, 3, 5, 6):  # staggered arrivals
            c, s, o = specs[len(jobs)]
            jobs.append(decoder.add(c, s, o))
        done += decoder.step()
    assert len(done) == 4 and decoder.rows_in_use == 0
    for job, want in zip(jobs, alone, strict=True):
        assert job.tokens == want


def test_cost_counts_rows_and_cfg_interval_frees_the_uncond_row(tiny_gpt):
    n = tiny_gpt.config.block_size
    decoder = Decoder(tiny_gpt, max_rows=5)
    free = decoder.add(1, 0, SamplingOptions())
    cfg = decoder.add(1, 0, SamplingOptions(cfg_scale=3.0))
    short = decoder.add(1, 0, SamplingOptions(cfg_scale=3.0, cfg_interval=2))  # guides tokens 0..3
    assert decoder.rows_in_use == 5
    while decoder.jobs:
        decoder.step()
    assert free.rows_x_steps == n
    assert cfg.rows_x_steps == 2 * n
    assert short.rows_x_steps == 2 * 4 + (n - 4)


def test_decoder_rejects_bad_input(tiny_gpt):
    decoder = Decoder(tiny_gpt, max_rows=2)
    with pytest.raises(ValueError, match="class id 11 out of range"):
        decoder.add(11, 0, SamplingOptions())
    with pytest.raises(ValueError, match="seed"):
        decoder.add(1, -1, SamplingOptions())
    with pytest.raises(ValueError, match="top_p"):
        SamplingOptions(top_p=0.0)
    decoder.add(1, 0, SamplingOptions(cfg_scale=2.0))
    with pytest.raises(RuntimeError, match="no room"):
        decoder.add(1, 0, SamplingOptions())


def test_cancel_frees_rows_and_leaves_the_others_untouched(tiny_gpt):
    want = generate(tiny_gpt, [6], seeds=[4], cfg_scale=3.0)[0].tolist()
    decoder = Decoder(tiny_gpt, max_rows=4)
    gone = decoder.add(2, 9, SamplingOptions(cfg_scale=3.0))
    kept = decoder.add(6, 4, SamplingOptions(cfg_scale=3.0))
    for _ in range(5):
        decoder.step()
    decoder.cancel(gone)  # its rows are refilled by moving the last rows down
    assert decoder.rows_in_use == 2 and decoder.jobs == [kept]
    while decoder.jobs:
        decoder.step()
    assert kept.tokens == want
