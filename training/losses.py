"""Training objectives: next-token cross-entropy and the CCA / DPO / unlearning preference losses.

Notation follows the CCA paper: for image tokens x and class c,
``r(x, c) = log p_theta(x | c) - log p_ref(x | c)`` summed over the image's tokens (the implicit
reward), with p_ref the frozen base model. Positives pair x with its own class; negatives pair
it with the class of the previous row in the (micro-)batch: ``torch.roll(labels, 1)``, row i gets
row i-1's class. The public LlamaGen+CCA code takes the next row's class instead; either pairing
gives every image one mismatched class drawn from the batch, so the objective is the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from samplers.gpt import GPT
from samplers.var import VAR

PREFERENCE_LOSSES = ("cca", "dpo", "unlearn")


def code_logprobs(logits: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The log-probability each position's logits [B, T, V] give its code [B, T]: [B, T]."""
    return torch.log_softmax(logits, dim=-1).gather(-1, codes.unsqueeze(-1)).squeeze(-1)


def teacher_inputs(model: torch.nn.Module, codes: torch.Tensor) -> torch.Tensor:
    """What a family's ``forward(cond, inputs)`` takes to predict ``codes`` [B, T]: the codes shifted
    by one (LlamaGen), or the next-scale inputs its VQVAE builds from them (VAR; no gradient)."""
    if isinstance(model, VAR):
        return model.vae.idx_to_var_input(model.vae.split_scales(codes))
    return codes[:, :-1]


def token_logprobs(model: torch.nn.Module, cond: torch.Tensor, codes: torch.Tensor,
                   inputs: torch.Tensor | None = None) -> torch.Tensor:
    """log p of every code given the class and the codes before it (before its scale, for VAR):
    [B, T] fp32. ``inputs`` (from ``teacher_inputs``) lets a wrapped model (DDP, FSDP) be called."""
    return code_logprobs(model(cond, teacher_inputs(model, codes) if inputs is None else inputs), codes)


def sequence_logprob(model: torch.nn.Module, cond: torch.Tensor, codes: torch.Tensor,
                     inputs: torch.Tensor | None = None) -> torch.Tensor:
    """log p(x | c) summed over the image's tokens (all scales' for VAR: 680 at 256 px): [B]."""
    return token_logprobs(model, cond, codes, inputs).sum(dim=1)


def next_token_loss(gpt: GPT, cond: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of teacher-forced next-token prediction (the pretraining loss)."""
    logits = gpt(cond, codes[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1))


@dataclass
class ContrastivePairs:
    """Class ids for the positive and negative side of each row, and how each row is weighted."""

    pos: torch.Tensor          # [B] own class, or the null class on unconditional rows
    neg: torch.Tensor          # [B] the rolled class, or the null class on unconditional rows
    uncond_rows: torch.Tensor  # [B] bool
    same_class_rows: torch.Tensor  # [B] bool: the rolled class equals the row's own class

    @property
    def negative_is_positive(self) -> torch.Tensor:
        """Rows whose "negative" actually matches the image: they count as positives."""
        return self.uncond_rows | self.same_class_rows


def contrastive_pairs(labels: torch.Tensor, null_class: int, uncond_ratio: float = 0.1,
                      generator: torch.Generator | None = None,
                      group_of: torch.Tensor | None = None) -> ContrastivePairs:
    """Negatives by rolling the labels by one; a share ``uncond_ratio`` of rows gets the null class
    on both sides so the unconditional branch keeps being trained (CCA+CFG still works).

    ``group_of`` [num_classes] (optional) maps each class to a group (a superclass, or an attribute
    the classes share): the labels are then rolled in the order of a stable sort by group, so a
    row's negative is a class of its own group unless the row is first of its group in the
    micro-batch. The rows keep their place; only who is paired with whom changes. This keeps the
    negatives hard: with random pairing most negatives differ in the most salient attribute, the
    loss separates them by that alone and saturates before it learns the subtler ones.
    """
    if not 0.0 <= uncond_ratio <= 1.0:
        raise ValueError(f"uncond_ratio must be in [0, 1], got {uncond_ratio}")
    if group_of is None:
        neg = torch.roll(labels, 1, dims=0)
    else:
        order = torch.sort(group_of.to(labels.device)[labels], stable=True).indices
        neg = torch.empty_like(labels)
        neg[order] = torch.roll(labels[order], 1, dims=0)
    uncond = torch.rand(labels.shape, generator=generator, device="cpu").to(labels.device) < uncond_ratio
    null = torch.full_like(labels, null_class)
    pos = torch.where(uncond, null, labels)
    neg = torch.where(uncond, null, neg)
    return ContrastivePairs(pos, neg, uncond, (neg == labels) & ~uncond)


def preference_loss(kind: str, pos_gap: torch.Tensor, neg_gap: torch.Tensor, negative_is_positive: torch.Tensor,
                    lam: float, beta: float) -> torch.Tensor:
    """The CCA loss and the two baselines of the paper, from implicit-reward gaps.

    ``pos_gap``/``neg_gap`` [B]: r(x, c_pos) and r(x, c_neg). Rows flagged in
    ``negative_is_positive`` (unconditional, or rolled onto their own class) are pushed up with
    weight 1; the others are pushed down with weight ``lam``. CCA and unlearning average each side
    over the batch and divide the sum by max(lam, 1); DPO ignores the flags and lam.
    """
    if kind not in PREFERENCE_LOSSES:
        raise ValueError(f"loss must be one of {PREFERENCE_LOSSES}, got {kind!r}")
    if kind == "dpo":
        return -F.logsigmoid(beta * (pos_gap - neg_gap)).mean()
    flags = negative_is_positive.to(pos_gap.dtype)
    weight = flags + (1.0 - flags) * lam
    sign = 2.0 * flags - 1.0
    if kind == "cca":
        loss = -F.logsigmoid(beta * pos_gap).mean() - (weight * F.logsigmoid(sign * beta * neg_gap)).mean()
    else:
        loss = -pos_gap.mean() - (weight * sign * neg_gap).mean()
    return loss / max(lam, 1.0)


def reward_stats(pos_gap: torch.Tensor, neg_gap: torch.Tensor, negative_is_positive: torch.Tensor,
                 beta: float) -> dict[str, float]:
    """Implicit-reward accuracy (share of true negatives whose reward is below the positive's) and
    the mean margin beta * (r_pos - r_neg) over those rows."""
    real = ~negative_is_positive
    if not bool(real.any()):
        return {"reward_acc": float("nan"), "margin": float("nan")}
    margin = beta * (pos_gap - neg_gap)[real]
    return {"reward_acc": float((margin > 0).float().mean()), "margin": float(margin.mean())}
