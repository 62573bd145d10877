"""Logit filtering and seeded inverse-CDF sampling."""
import torch

from samplers.generate import filter_logits, sample_from_logits, seed_keys, uniform_noise


def _f(logits, temperature=1.0, top_k=0, top_p=1.0):
    b = logits.shape[0]
    return filter_logits(logits, torch.full((b,), temperature), torch.full((b,), top_k, dtype=torch.long),
                         torch.full((b,), top_p))


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept = torch.isfinite(_f(logits, top_k=2))[0]
    assert kept.tolist() == [False, True, False, True, False]


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(_f(logits, top_p=0.7))[0].tolist() == [True, True, False, False]
    assert torch.isfinite(_f(logits, top_p=0.45))[0].tolist() == [True, False, False, False]
    assert torch.isfinite(_f(logits, top_p=0.81))[0].tolist() == [True, True, True, False]
    assert torch.isfinite(_f(logits, top_p=1.0))[0].all()


def test_per_row_options():
    logits = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    out = filter_logits(logits, torch.tensor([1.0, 1.0]), torch.tensor([1, 0]), torch.tensor([1.0, 1.0]))
    assert torch.isfinite(out).tolist() == [[False, False, True], [True, True, True]]


def test_temperature_zero_and_top_k_one_are_greedy():
    logits = torch.randn(6, 50)
    u = torch.rand(6)
    for t, k in [(0.0, 0), (1.0, 1)]:
        got = sample_from_logits(logits, u, torch.full((6,), t), torch.full((6,), k), torch.ones(6))
        assert torch.equal(got, logits.argmax(-1))


def test_noise_is_uniform_and_depends_only_on_seed_and_index():
    keys = seed_keys(range(20000))
    u = uniform_noise(keys, 7)
    assert 0 < u.min() and u.max() < 1
    hist = torch.histc(u, bins=10, min=0, max=1)
    assert (hist - 2000).abs().max() < 200  # ~4.5 sigma
    assert torch.equal(uniform_noise(seed_keys([5, 123]), 7), torch.stack([u[5], u[123]]))
    assert not torch.equal(uniform_noise(keys[:100], 8), u[:100])
    big = seed_keys([2**63 - 1, 2**32, 0])
    assert len(set(big.tolist())) == 3


def test_sampling_matches_the_distribution():
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    n = 20000
    logits = probs.log().expand(n, 4)
    u = uniform_noise(seed_keys(range(n)), 0)
    draws = sample_from_logits(logits, u, torch.ones(n), torch.zeros(n, dtype=torch.long), torch.ones(n))
    freq = torch.bincount(draws, minlength=4).float() / n
    assert (freq - probs).abs().max() < 0.015
    # filtered tokens are never drawn
    draws_k = sample_from_logits(logits, u, torch.ones(n), torch.full((n,), 2), torch.ones(n))
    assert set(draws_k.tolist()) == {0, 1}
