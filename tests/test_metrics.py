"""Metrics comparable with published numbers: precision / recall on every sample (as ADM's
evaluator), and sFID from ADM's spatial features."""
import numpy as np
import torch

from evaluation.evaluate import frechet_distance, gaussian_stats, precision_recall
from evaluation.fid import batch_metrics
from evaluation.inception import FIDInception


def test_precision_recall_by_hand():
    # 1-D features: real at 0, 1, 2, 3; samples at 0.5 and 10. With k = 1 every real ball has radius 1,
    # so 0.5 is inside and 10 is not (precision 1/2); each sample's ball reaches 9.5, which from 0.5
    # covers every real point (recall 1).
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])
    fake = torch.tensor([[0.5], [10.0]])
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)
    # and the other way round: real 0..3 as samples against a reference of 0.5 and 10
    assert precision_recall(fake, real, k=1) == (1.0, 0.5)


def test_precision_recall_uses_every_sample_in_blocks(monkeypatch):
    import evaluation.evaluate as ev

    gen = torch.Generator().manual_seed(0)
    real, fake = torch.randn(700, 8, generator=gen), torch.randn(900, 8, generator=gen) * 1.3 + 0.2
    whole = precision_recall(real, fake)
    monkeypatch.setattr(ev, "PR_BLOCK", 64)  # tiny blocks: the same answer
    assert precision_recall(real, fake) == whole
    # brute force on the full matrices
    radii_r = torch.cdist(real, real).kthvalue(4, dim=1).values
    radii_f = torch.cdist(fake, fake).kthvalue(4, dim=1).values
    d = torch.cdist(fake, real)
    assert whole == (float((d <= radii_r).any(1).float().mean()), float((d.T <= radii_f).any(1).float().mean()))


def _random_inception() -> FIDInception:
    torch.manual_seed(0)
    net = FIDInception()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    return net.eval()


def test_sfid_is_the_frechet_distance_of_mixed_6d_branch1x1_first_7_channels():
    net = _random_inception()
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    captured = []
    hook = net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.append(o))

    def spatial_by_hand(images):
        captured.clear()
        with torch.no_grad():
            net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
        nhwc = captured[0].permute(0, 2, 3, 1)[..., :7]  # ADM: NHWC tensor, [..., :7]
        return nhwc.reshape(len(images), -1).double()

    sa, sb = spatial_by_hand(a), spatial_by_hand(b)
    hook.remove()
    assert sa.shape == (6, 17 * 17 * 7)
    expected = frechet_distance(*gaussian_stats(sa), *gaussian_stats(sb))
    got = batch_metrics(net, {"arr_0": a}, {"arr_0": b}, batch_size=4, progress=False)
    assert abs(got["sfid"] - expected) < 1e-6 * max(1.0, expected) and got["sfid"] > 0
    same = batch_metrics(net, {"arr_0": a}, {"arr_0": a}, batch_size=4, progress=False)
    assert abs(same["sfid"]) < 1e-3 and same["pr_n"] == {"reference": 6, "samples": 6}
    # precomputed spatial statistics in the reference (ADM's mu_s / sigma_s) are used as they are
    mu_s, sigma_s = gaussian_stats(sb)
    ref = {"mu": np.zeros(2048), "sigma": np.eye(2048), "mu_s": mu_s.numpy(), "sigma_s": sigma_s.numpy()}
    assert abs(batch_metrics(net, {"arr_0": a}, ref, progress=False)["sfid"] - expected) < 1e-6 * max(1.0, expected)
