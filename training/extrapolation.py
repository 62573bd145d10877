"""Weight extrapolation of a fine-tune along its update: ``ref + alpha * (tuned - ref)``.

A CCA fine-tune is an alignment fine-tune (a DPO-like loss against a frozen reference), and for such
models moving further along the update direction, past the trained weights, can reach a stronger
alignment than the training itself stopped at (ExPO: Zheng et al. 2024, "Weak-to-Strong
Extrapolation Expedites Alignment"). ``alpha`` 1 is the fine-tune, 0 the reference; the model keeps
one forward pass per token, so the cca mode's cost does not change. The shipped default's choice of
``alpha`` and the sweep behind it are in docs/eval/README.md ("Extrapolating the fine-tune").
"""

from __future__ import annotations

import copy
import math

import torch


def extrapolate(ref: torch.nn.Module, tuned: torch.nn.Module, alpha: float) -> torch.nn.Module:
    """A copy of ``tuned`` with every parameter at ``ref + alpha * (tuned - ref)``.

    The sum is taken in float64 and rounded once to the tuned tensor's dtype, so the result does not
    depend on the order of operations. Buffers (index tables, rotary tables, VAR's -inf attention
    mask, where the formula would give NaN) are not weights: they must be equal in both models, and
    differing ones mean the two are not the same architecture.
    """
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite number, got {alpha}")
    ref_state, tuned_state = ref.state_dict(), tuned.state_dict()
    if ref_state.keys() != tuned_state.keys():
        missing = sorted(ref_state.keys() ^ tuned_state.keys())
        raise ValueError(f"ref and tuned are different models: keys only in one of them: {missing[:5]}")
    weights = {name for name, _ in tuned.named_parameters()}
    out_state = {}
    for key, t in tuned_state.items():
        r = ref_state[key]
        if r.shape != t.shape:
            raise ValueError(f"ref and tuned differ in the shape of {key}: {tuple(r.shape)} against {tuple(t.shape)}")
        if key not in weights:
            if not torch.equal(r, t):
                raise ValueError(f"ref and tuned differ in the non-weight tensor {key}")
            out_state[key] = t
            continue
        r64, t64 = r.to(torch.float64), t.to(torch.float64)
        out_state[key] = (r64 + alpha * (t64 - r64)).to(t.dtype)
    model = copy.deepcopy(tuned)
    model.load_state_dict(out_state)
    return model
