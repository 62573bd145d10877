"""KV-cached decoding for class-conditional AR image models, in the four modes of the spec.

One prefill of the class token, then one new token per step, over a static KV cache. CFG runs
the conditional and unconditional rows of an image in one doubled batch and mixes their logits:
``uncond + s * (cond - uncond)``.

``Decoder`` is the LlamaGen family's decoding loop: images (1 row, or 2 with CFG) join between
steps and leave when done, each at its own position. ``run_decoder`` (any family's decoder) puts a
whole batch in at once, as ``samplers.generate()`` does; the server's engine feeds it continuously.
An image depends only on (weights, class, seed, options): the sampling noise is a counter-based
hash of (seed, token index), not a shared RNG stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .gpt import GPT, StepPositions
from .modes import InvalidRequest, SamplingOptions, check_class, check_seed

_MASK32 = 0xFFFFFFFF


# --------------------------------------------------------------------------------------------
# Seeded noise: u(seed, token index) in (0, 1), the same whatever else shares the batch.
# --------------------------------------------------------------------------------------------
def _mix32(x: torch.Tensor) -> torch.Tensor:
    # Integer avalanche on values < 2**32; both multipliers are < 2**31, so int64 never overflows.
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) & _MASK32
    return x ^ (x >> 16)


def seed_keys(seeds: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """Fold 63-bit seeds to 32-bit keys for ``uniform_noise``."""
    for s in seeds:
        check_seed(s)
    s = torch.tensor([int(x) for x in seeds], dtype=torch.int64, device=device)
    return _mix32((s & _MASK32) ^ _mix32((s >> 32) ^ 0x5BD1E995))


def uniform_noise(keys: torch.Tensor, token_index: torch.Tensor | int) -> torch.Tensor:
    """One float32 in (0, 1) per key for the given token index."""
    index = torch.as_tensor(token_index, dtype=torch.int64, device=keys.device)
    h = _mix32(keys ^ _mix32((index * 0x9E3779B1 + 0x632BE5AB) & _MASK32))
    return ((h >> 8).float() + 0.5) / float(1 << 24)


def random_seeds(n: int) -> list[int]:
    """Seeds drawn from torch's global RNG, so ``torch.manual_seed`` makes them reproducible."""
    return torch.randint(0, 2**31 - 1, (n,)).tolist()


# --------------------------------------------------------------------------------------------
# Logits -> tokens
# --------------------------------------------------------------------------------------------
def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """Temperature, then top-k, then top-p (LlamaGen's order and tie rules), per row.

    logits [B, V] fp32; temperature, top_p float [B]; top_k long [B] (0 = off). Removed entries
    become -inf.
    """
    logits = logits / temperature.clamp(min=1e-5)[:, None]
    if bool((top_k > 0).any()):
        k = top_k.clamp(max=logits.shape[-1])
        kth = torch.topk(logits, int(k.max()), dim=-1).values.gather(1, (k - 1).clamp(min=0)[:, None])
        kth = torch.where(k[:, None] > 0, kth, torch.full_like(kth, -float("inf")))
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if bool((top_p < 1).any()):
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # keep the first token past the threshold
        threshold = torch.where(top_p < 1, top_p, torch.full_like(top_p, float("inf")))
        remove_sorted = mass_before > threshold[:, None]
        remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)
        logits = logits.masked_fill(remove, -float("inf"))
    return logits


def sample_from_logits(logits: torch.Tensor, uniform: torch.Tensor, temperature: torch.Tensor,
                       top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling of one token per row with the given uniforms [B]; greedy rows
    (temperature 0 or top_k 1) take the argmax."""
    greedy = (temperature == 0) | (top_k == 1)
    if bool(greedy.all()):
        return logits.argmax(dim=-1)
    probs = torch.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    cdf = torch.cumsum(probs, dim=-1)
    target = (uniform.to(cdf.dtype) * cdf[:, -1])[:, None]
    sampled = torch.searchsorted(cdf, target).squeeze(1).clamp(max=logits.shape[-1] - 1)
    return torch.where(greedy, logits.argmax(dim=-1), sampled)


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: torch.Tensor) -> torch.Tensor:
    return uncond + cfg_scale[:, None] * (cond - uncond)


# --------------------------------------------------------------------------------------------
# The decoding loop
# --------------------------------------------------------------------------------------------
def check_llamagen_options(options: SamplingOptions) -> None:
    if options.more_smooth:
        raise InvalidRequest("more_smooth", "more_smooth is VAR's option; this is a LlamaGen model")
    if options.cfg_schedule == "linear":
        raise InvalidRequest("cfg_schedule", "LlamaGen models guide every token alike (cfg_schedule constant); "
                             "use cfg_interval to guide the first tokens only", allowed=["constant"])


@dataclass(eq=False)
class ImageJob:
    """One image being decoded: its class, seed, options and the tokens sampled so far."""

    class_id: int
    seed: int
    options: SamplingOptions
    tokens: list[int] = field(default_factory=list)
    rows_x_steps: int = 0  # cost: cache rows used, summed over steps
    cond_row: int = -1
    uncond_row: int = -1  # -1 when not (or no longer) guided
    tag: object = None  # free for the caller (e.g. the server's request handle)
    seed_key: int = 0

    def __post_init__(self) -> None:
        self.seed_key = int(seed_keys([self.seed])[0])

    @property
    def rows(self) -> int:
        """Rows it holds now (a guided image drops its unconditional row past cfg_interval)."""
        return 1 + (self.uncond_row >= 0)


class Decoder:
    """Rows of one model's static KV cache decoded together, one token per image per step.

    Images join with ``add`` (between steps) and leave when their last token is sampled; the rows
    they free are refilled by moving the last rows down, so active rows always are 0..R-1.
    """

    def __init__(self, gpt: GPT, max_rows: int, compile: bool = False):
        """``compile=True`` runs the model step through torch.compile with static shapes (meant for
        CUDA; it compiles once per number of active rows)."""
        if max_rows < 1:
            raise ValueError("max_rows must be >= 1")
        self.gpt = gpt
        self.compiled = compile
        self._step_fn = _compiled_step(gpt) if compile else gpt.decode_step
        self.max_rows = max_rows
        self.num_tokens = gpt.config.block_size
        if gpt.kv_cache_rows < max_rows:
            gpt.setup_kv_cache(max_rows)
        gpt.pack_linears()  # no-op while the packed weights are current
        self.jobs: list[ImageJob] = []
        self.row_owner: list[ImageJob] = []  # row -> job
        self.row_input: list[int] = []  # row -> next input (class id at position 0, else a token)
        self.steps = 0
        # rows run at each recent step (a benchmark counts FLOPs from it); bounded for long-lived engines
        self.rows_log: deque[int] = deque(maxlen=1 << 16)

    @property
    def rows_in_use(self) -> int:
        return len(self.row_owner)

    def free_rows(self) -> int:
        return self.max_rows - self.rows_in_use

    def add(self, class_id: int, seed: int, options: SamplingOptions, tag: object = None) -> ImageJob:
        """Admit one image (between steps). The null class is a valid class here: it samples the
        unconditional distribution."""
        config = self.gpt.config
        class_id = check_class(class_id, config.num_classes, allow_null=config.has_null_class)
        seed = check_seed(seed)
        if options.guided and not config.has_null_class:
            raise ValueError("this model has no null class (class_dropout_prob = 0): CFG is unavailable")
        check_llamagen_options(options)
        job = ImageJob(class_id, seed, options, tag=tag)
        need = options.rows
        if need > self.free_rows():
            raise RuntimeError(f"no room: the image needs {need} rows, {self.free_rows()} free")
        job.cond_row = self._claim_row(job, class_id)
        if options.guided:
            job.uncond_row = self._claim_row(job, self.gpt.config.null_class)
        self.jobs.append(job)
        return job

    def cancel(self, job: ImageJob) -> None:
        """Drop an unfinished image and free its rows (e.g. its client went away)."""
        if job in self.jobs:
            self.jobs.remove(job)
            self._release_rows([job.cond_row, job.uncond_row])

    def _claim_row(self, job: ImageJob, first_input: int) -> int:
        self.row_owner.append(job)
        self.row_input.append(first_input)
        return len(self.row_owner) - 1

    def _release_rows(self, rows: list[int]) -> None:
        # Highest first: only the last row ever moves, so lower pending rows stay where they are.
        for row in sorted((r for r in rows if r >= 0), reverse=True):
            _set_row(self.row_owner[row], row, -1)
            last = len(self.row_owner) - 1
            if row != last:
                self.gpt.move_cache_row(last, row)
                mover = self.row_owner[last]
                self.row_owner[row], self.row_input[row] = mover, self.row_input[last]
                _set_row(mover, last, row)
            self.row_owner.pop()
            self.row_input.pop()

    @torch.inference_mode()
    def step(self) -> list[ImageJob]:
        """Advance every image by one token; return the images that are now complete."""
        if not self.jobs:
            return []
        device = self.gpt.device
        positions = [len(owner.tokens) for owner in self.row_owner]
        inputs = torch.tensor(self.row_input, device=device)
        static = self.num_tokens if self.compiled else None
        logits = self._step_fn(inputs, StepPositions.build(positions, device, static))

        jobs = self.jobs
        next_logits = logits.index_select(0, torch.tensor([j.cond_row for j in jobs], device=device))
        guided = [i for i, j in enumerate(jobs) if j.uncond_row >= 0 and j.options.guides_token(len(j.tokens))]
        if guided:
            sel = torch.tensor(guided, device=device)
            uncond = logits.index_select(0, torch.tensor([jobs[i].uncond_row for i in guided], device=device))
            scale = torch.tensor([jobs[i].options.cfg_scale for i in guided], device=device)
            next_logits = next_logits.index_copy(0, sel, guided_logits(next_logits[sel], uncond, scale))

        opts = [j.options for j in jobs]
        tokens = sample_from_logits(
            next_logits,
            uniform_noise(torch.tensor([j.seed_key for j in jobs], device=device),
                          torch.tensor([len(j.tokens) for j in jobs], device=device)),
            torch.tensor([o.temperature for o in opts], device=device),
            torch.tensor([o.top_k for o in opts], device=device),
            torch.tensor([o.top_p for o in opts], device=device),
        ).tolist()

        self.steps += 1
        self.rows_log.append(len(self.row_owner))
        finished, spent_rows = [], []
        for job, token in zip(jobs, tokens, strict=True):
            job.rows_x_steps += job.rows
            job.tokens.append(token)
            if len(job.tokens) == self.num_tokens:
                finished.append(job)
                spent_rows += [job.cond_row, job.uncond_row]
                continue
            self.row_input[job.cond_row] = token
            if job.uncond_row >= 0:
                if job.options.guides_token(len(job.tokens)):
                    self.row_input[job.uncond_row] = token
                else:  # past cfg_interval: the unconditional row is no longer needed
                    spent_rows.append(job.uncond_row)
        for job in finished:
            self.jobs.remove(job)
        self._release_rows(spent_rows)
        return finished


_COMPILED: dict[int, object] = {}


def _compiled_step(gpt: GPT):
    if id(gpt) not in _COMPILED:
        _COMPILED[id(gpt)] = torch.compile(gpt.decode_step, dynamic=False, fullgraph=False)
    return _COMPILED[id(gpt)]


def _set_row(job: ImageJob, old: int, new: int) -> None:
    if job.cond_row == old:
        job.cond_row = new
    else:
        job.uncond_row = new


def run_decoder(
    decoder: Decoder,
    classes: Sequence[int],
    seeds: Sequence[int],
    options: SamplingOptions,
    progress: bool = False,
    total_steps: int | None = None,
) -> list[ImageJob]:
    """Decode one image per (class, seed) as one batch on an empty decoder (of any family); returns
    the finished jobs in order."""
    if len(seeds) != len(classes):
        raise ValueError(f"got {len(seeds)} seeds for {len(classes)} classes")
    if not classes:
        raise ValueError("classes is empty")
    jobs = [decoder.add(int(c), int(s), options) for c, s in zip(classes, seeds, strict=True)]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc="steps", unit="step", leave=False)
    while decoder.jobs:
        decoder.step()
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return jobs
