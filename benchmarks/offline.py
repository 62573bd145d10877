"""Offline latency / throughput / cost benchmark of the four modes, and the device's measured peaks.

For each mode and batch size: warm-up, then ``repeats`` timed runs of the sampler (the same
``run_decoder`` the CLI, server and UI use) and of the VQ decode. Reported per cell: latency per
batch (every image of a batch finishes together) as median and spread, images/s, tokens/s,
rows x steps per image, achieved GFLOP/s and GB/s of the GPT part against the device's measured
GEMM and memory peaks, peak memory, and cost per 1000 images at a given price per hour.

Where the FLOPs and bytes come from (per decoding step over R rows at context length L):
  FLOPs  = R * (2 * P_matmul + 4 * n_layer * dim * L)      (weights GEMV/GEMM + attention)
  bytes  = P_matmul * w + R * 2 * n_layer * kv_dim * L * w  (weights once + the KV cache read)
with P_matmul the parameters of all linear layers (embeddings are gathered, not multiplied) and
w the bytes per weight. At batch 1 a step reads all weights for 2 FLOPs per weight: bandwidth
bound, so CFG's second row is nearly free in time; at large batch the step is compute bound and
CFG's doubled rows cost twice the time. That is the cost CCA removes.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from samplers.generate import run_decoder
from samplers.gpt import GPT
from samplers.pipeline import Pipeline, normalize_mode
from samplers.var import VAR

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)


class Timer:
    """Wall time on CPU; CUDA events (no host sync in between) on GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Timer:
        if self.cuda:
            self._start, self._end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.cuda:
            self._end.record()
            self._end.synchronize()
            self.seconds = self._start.elapsed_time(self._end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self._t


def matmul_params(gpt: GPT) -> int:
    return sum(m.weight.numel() for m in gpt.modules() if isinstance(m, torch.nn.Linear))


def decode_work(gpt: torch.nn.Module, rows_per_step: Sequence[int]) -> tuple[float, float]:
    """(FLOPs, bytes) of the transformer over decoding steps with the given active rows per step."""
    if isinstance(gpt, VAR):
        return _var_work(gpt, rows_per_step)
    c = gpt.config
    p = matmul_params(gpt)
    w = next(gpt.parameters()).element_size()
    kv_dim = c.kv_heads * c.head_dim
    flops = bytes_ = 0.0
    for step, rows in enumerate(rows_per_step):
        ctx = step + 1  # positions attended (class token + tokens so far)
        flops += rows * (2 * p + 4 * c.n_layer * c.dim * ctx)
        bytes_ += p * w + rows * 2 * c.n_layer * kv_dim * ctx * w
    return flops, bytes_


def _var_work(var: VAR, rows_per_step: Sequence[int]) -> tuple[float, float]:
    """VAR: step k runs pn_k^2 tokens per row through the per-token linears, the AdaLN linears once
    per row, and attends to every earlier token of the image."""
    c = var.config
    per_row = sum(m.weight.numel() for n, m in var.named_modules() if isinstance(m, torch.nn.Linear) and "ada_lin" in n)
    per_token = matmul_params(var) - per_row
    w = next(var.parameters()).element_size()
    flops = bytes_ = 0.0
    for step, rows in enumerate(rows_per_step):
        length = c.patch_nums[step] ** 2
        ctx = c.scale_starts[step] + length
        flops += rows * (2 * per_token * length + 2 * per_row + 4 * c.depth * c.embed_dim * length * ctx)
        bytes_ += (per_token + per_row) * w + rows * 2 * c.depth * c.embed_dim * ctx * w
    return flops, bytes_


def measure_peaks(device: torch.device, dtype: torch.dtype = torch.float32, seconds: float = 1.0) -> dict[str, float]:
    """Achievable GEMM GFLOP/s (square matmul) and memory GB/s (a large reduction) on this device."""
    n = 2048 if device.type == "cpu" else 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    big = torch.empty(64 * 2**20 if device.type == "cpu" else 1024 * 2**20, device=device, dtype=torch.float32)
    big.fill_(1.0)

    def best(fn, work: float) -> float:
        fn()  # warm-up
        rates, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds or len(rates) < 3:
            with Timer(device) as t:
                fn()
            rates.append(work / t.seconds)
        return max(rates)

    gemm = best(lambda: a @ b, 2 * n**3) / 1e9
    mem = best(lambda: big.sum(), big.numel() * 4) / 1e9
    return {"gemm_gflops": round(gemm, 1), "mem_gbps": round(mem, 1), "gemm_size": n, "dtype": str(dtype)}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench_cell(pipe: Pipeline, mode: str, batch: int, repeats: int, warmup: int = 1,
               options: dict[str, Any] | None = None, vq_decode: bool = True) -> dict[str, Any]:
    """Time one (mode, batch size): GPT decoding and VQ decoding, separately and in total.
    ``vq_decode=False`` times the GPT only (latency = token generation), e.g. for a VQ-16 decoder
    at 256 px on a CPU, where the decode, the same in every mode, would dominate the wall time."""
    mode = normalize_mode(mode)
    gpt = pipe.model_for(mode)
    opts = pipe.options_for(mode, **(options or {}))
    device = gpt.device
    classes = [i % pipe.num_classes for i in range(batch)]
    gpt_s, vq_s, rxs = [], [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for rep in range(warmup + repeats):
        seeds = [rep * batch + i for i in range(batch)]
        decoder = pipe.family.decoder(gpt, batch * opts.rows, compile=pipe.compile)
        with Timer(device) as t_gpt:
            jobs = run_decoder(decoder, classes, seeds, opts)
        with Timer(device) as t_vq:
            if vq_decode:
                pipe.decode_images([j.tokens for j in jobs])
        if rep >= warmup:
            gpt_s.append(t_gpt.seconds)
            vq_s.append(t_vq.seconds)
            rxs.append(sum(j.rows_x_steps for j in jobs) / batch)
    tokens = pipe.family.tokens_per_image(gpt)
    # the first step is the class token's prefill; rows per step as the decoder ran them
    flops, bytes_ = decode_work(gpt, decoder.rows_log)
    total = [g + v for g, v in zip(gpt_s, vq_s, strict=True)]
    med_gpt, med_total = statistics.median(gpt_s), statistics.median(total)
    return {
        "mode": mode, "batch": batch, "repeats": repeats, "cfg_scale": opts.cfg_scale, "vq_decode": vq_decode,
        "latency_s": {"median": round(med_total, 5), "min": round(min(total), 5), "max": round(max(total), 5),
                      "stdev": round(statistics.stdev(total), 5) if len(total) > 1 else 0.0},
        "gpt_s_median": round(med_gpt, 5), "vq_s_median": round(statistics.median(vq_s), 5),
        "images_per_s": round(batch / med_total, 3),
        "tokens_per_s": round(batch * tokens / med_gpt, 1),
        "rows_x_steps_per_image": rxs[0],
        "gflop_per_batch": round(flops / 1e9, 3),
        "achieved_gflops": round(flops / med_gpt / 1e9, 4),
        "achieved_gbps": round(bytes_ / med_gpt / 1e9, 4),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
    }


def run_offline(pipe: Pipeline, modes: Sequence[str], batch_sizes: Sequence[int], repeats: int = 3,
                warmup: int = 1, usd_per_hour: float = 0.0, peaks: dict[str, float] | None = None,
                progress: bool = True, options: dict[str, Any] | None = None, vq_decode: bool = True
                ) -> dict[str, Any]:
    from tqdm.auto import tqdm

    device = pipe.gpt.device
    cells: list[dict[str, Any]] = []
    grid = [(m, b) for b in batch_sizes for m in modes]
    skipped: list[dict[str, Any]] = []
    for mode, batch in tqdm(grid, desc="bench", disable=not progress):
        try:
            cell = bench_cell(pipe, mode, batch, repeats, warmup, options, vq_decode)
        except torch.OutOfMemoryError:  # "as far as memory allows"
            skipped.append({"mode": mode, "batch": batch, "reason": "out of memory"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        if peaks:
            cell["gemm_fraction_of_peak"] = cell["achieved_gflops"] / peaks["gemm_gflops"]
            cell["bandwidth_fraction_of_peak"] = cell["achieved_gbps"] / peaks["mem_gbps"]
        cell["usd_per_1000_images"] = round(usd_per_hour * 1000 / cell["images_per_s"] / 3600, 6)
        cells.append(cell)
    ratios = []
    for batch in batch_sizes:
        by_mode = {c["mode"]: c for c in cells if c["batch"] == batch}
        if "cfg" in by_mode and "cca" in by_mode:
            cfg, cca = by_mode["cfg"], by_mode["cca"]
            ratios.append({"batch": batch,
                           "latency_ratio_cfg_over_cca": round(cfg["latency_s"]["median"] / cca["latency_s"]["median"],
                                                               3),
                           "gpt_time_ratio_cfg_over_cca": round(cfg["gpt_s_median"] / cca["gpt_s_median"], 3),
                           "rows_x_steps_ratio": round(cfg["rows_x_steps_per_image"] / cca["rows_x_steps_per_image"],
                                                       3)})
    return {"model": pipe.name, "device": describe_device(device), "dtype": str(pipe.gpt.dtype),
            "tokens_per_image": pipe.tokens_per_image, "image_size": pipe.image_size,
            "gpt_params": sum(p.numel() for p in pipe.gpt.parameters()), "peaks": peaks,
            "usd_per_hour": usd_per_hour, "cells": cells, "cfg_over_cca": ratios, "skipped": skipped,
            "torch": torch.__version__, "threads": torch.get_num_threads(), "compile": pipe.compile,
            "date": time.strftime("%Y-%m-%d %H:%M")}


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "cpu")
    except OSError:
        name = "cpu"
    return f"{name} ({torch.get_num_threads()} threads)"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"model `{report['model']}` on {report['device']}, {report['dtype']}, {report['tokens_per_image']} "
             f"tokens/image, {report['date']}", ""]
    if report["cells"] and not report["cells"][0].get("vq_decode", True):
        lines += ["latency = token generation only (`--no-vq-decode`: the VQ decode, the same in every mode, "
                  "not run)", ""]
    if report.get("peaks"):
        pk = report["peaks"]
        lines += [f"measured peaks: GEMM {pk['gemm_gflops']} GFLOP/s, memory {pk['mem_gbps']} GB/s", ""]
    priced = bool(report.get("usd_per_hour"))  # the $ column only when a price was given (--usd-per-hour)
    lines += ["| mode | batch | latency s (median) | spread s | img/s | tok/s | rows×steps/img | GFLOP/s (% peak) "
              "| GB/s (% peak) | peak MB |" + (" $/1k img |" if priced else ""), "|" + "---|" * (11 if priced else 10)]
    for c in report["cells"]:
        g = f"{c['achieved_gflops']}" + (f" ({100 * c['gemm_fraction_of_peak']:.0f}%)" if "gemm_fraction_of_peak" in c
                                         else "")
        b = f"{c['achieved_gbps']}" + (f" ({100 * c['bandwidth_fraction_of_peak']:.0f}%)"
                                       if "bandwidth_fraction_of_peak" in c else "")
        lat = c["latency_s"]
        lines.append(f"| {c['mode']} | {c['batch']} | {lat['median']:.4f} | {lat['min']:.4f}–{lat['max']:.4f} | "
                     f"{c['images_per_s']} | {c['tokens_per_s']} | {c['rows_x_steps_per_image']:g} | {g} | {b} | "
                     f"{c['peak_memory_mb']} |" + (f" {c['usd_per_1000_images']:.4g} |" if priced else ""))
    if report["cfg_over_cca"]:
        lines += ["", "| batch | cfg/cca latency | cfg/cca GPT time | cfg/cca rows×steps |", "|---|---|---|---|"]
        for r in report["cfg_over_cca"]:
            lines.append(f"| {r['batch']} | {r['latency_ratio_cfg_over_cca']} | {r['gpt_time_ratio_cfg_over_cca']} | "
                         f"{r['rows_x_steps_ratio']} |")
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], prefix: str) -> list[str]:
    """Throughput vs batch size per mode, and the cfg/cca ratio vs batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
    for mode in dict.fromkeys(c["mode"] for c in report["cells"]):
        cs = [c for c in report["cells"] if c["mode"] == mode]
        ax.plot([c["batch"] for c in cs], [c["images_per_s"] for c in cs], "o-", label=mode)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (images)")
    ax.set_ylabel("images / s")
    ax.set_title(f"{report['model']}: throughput ({report['device'][:40]})", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    paths.append(f"{prefix}_throughput.png")
    fig.savefig(paths[-1])
    plt.close(fig)
    if report["cfg_over_cca"]:
        fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=120)
        rs = report["cfg_over_cca"]
        ax.plot([r["batch"] for r in rs], [r["latency_ratio_cfg_over_cca"] for r in rs], "o-",
                label="cfg / cca latency")
        ax.plot([r["batch"] for r in rs], [r["rows_x_steps_ratio"] for r in rs], "--", color="grey",
                label="cfg / cca rows × steps")
        ax.axhline(1.0, color="black", linewidth=0.5)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0.5, max(2.3, max(r["latency_ratio_cfg_over_cca"] for r in rs) + 0.2))
        ax.set_xlabel("batch size (images)")
        ax.set_ylabel("ratio")
        ax.set_title("what CCA saves: CFG's cost over CCA's, by batch size", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        paths.append(f"{prefix}_cost_ratio.png")
        fig.savefig(paths[-1])
        plt.close(fig)
    return paths



# ---- reference samplers, timed on the same weights ----------------------------------------
def alternate(device: torch.device, repeats: int, runs: dict[str, Callable[[int], Any]]) -> dict[str, list[float]]:
    """Seconds of each run, ``repeats`` rounds, the runs taking turns within a round (the machine's
    drift hits all of them alike); each run gets the round's index."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(repeats):
        for name, run in runs.items():
            with torch.no_grad(), Timer(device) as t:
                run(rep)
            times[name].append(t.seconds)
    return times


# ---- LlamaGen's own generate(), timed on the same weights --------------------------------
def llamagen_model(gpt: GPT, llamagen_path: str) -> torch.nn.Module:
    """LlamaGen's Transformer from a user's checkout, with our GPT's config and weights (same keys)."""
    import sys
    import warnings

    if llamagen_path not in sys.path:
        sys.path.insert(0, llamagen_path)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from autoregressive.models.gpt import ModelArgs, Transformer
    except ImportError as e:
        raise FileNotFoundError(f"no LlamaGen checkout at {llamagen_path} ({e})") from None
    c = gpt.config
    args = ModelArgs(dim=c.dim, n_layer=c.n_layer, n_head=c.n_head, n_kv_head=c.n_kv_head, multiple_of=c.multiple_of,
                     ffn_dim_multiplier=c.ffn_dim_multiplier, rope_base=c.rope_base, norm_eps=c.norm_eps,
                     num_classes=c.num_classes, class_dropout_prob=c.class_dropout_prob, vocab_size=c.vocab_size,
                     cls_token_num=1, block_size=c.block_size, model_type="c2i")
    ref = Transformer(args).to(device=gpt.device, dtype=gpt.dtype).eval()
    result = ref.load_state_dict(gpt.state_dict(), strict=False)
    if set(result.missing_keys) - {"freqs_cis"} or result.unexpected_keys:
        raise ValueError(f"LlamaGen's model does not match: missing {result.missing_keys}, "
                         f"unexpected {result.unexpected_keys}")
    return ref


def time_llamagen(ref: torch.nn.Module, gpt: GPT, batch: int, cfg_scale: float, top_k: int = 0,
                  repeats: int = 3) -> dict[str, Any]:
    """Best-of-``repeats`` seconds per image of LlamaGen's generate() and ours, alternating runs."""
    from autoregressive.models.generate import generate as llamagen_generate

    from samplers import generate

    device = gpt.device
    classes = torch.arange(batch, device=device) % gpt.config.num_classes
    times = alternate(device, repeats, {
        "llamagen": lambda rep: llamagen_generate(ref, classes, gpt.config.block_size, cfg_scale=cfg_scale,
                                                  temperature=1.0, top_k=top_k, top_p=1.0, sample_logits=True),
        "ccaserve": lambda rep: generate(gpt, classes, cfg_scale=cfg_scale, top_k=top_k, seeds=list(range(batch))),
    })
    best = {k: min(v) / batch for k, v in times.items()}
    return {"batch": batch, "cfg_scale": cfg_scale, "llamagen_s_per_image": round(best["llamagen"], 5),
            "ccaserve_s_per_image": round(best["ccaserve"], 5),
            "speedup": round(best["llamagen"] / best["ccaserve"], 3), "runs_s": times}


# ---- VAR's own autoregressive_infer_cfg(), timed on the same weights ----------------------
def var_reference(pipe: Pipeline, var_path: str) -> torch.nn.Module:
    """VAR's model (and VQVAE) from a user's checkout, with the pipeline's VAR and VAE weights."""
    import sys
    import warnings

    if var_path not in sys.path:
        sys.path.insert(0, var_path)
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        from models.basic_vae import Decoder as RefDecoder
        from models.basic_vae import Encoder as RefEncoder
        from models.var import VAR as RefVAR
        from models.vqvae import VQVAE as RefVQVAE
    except ImportError as e:
        raise FileNotFoundError(f"no VAR checkout at {var_path} ({e})") from None
    vae, var = pipe.vq, pipe.gpt
    vc, c = vae.config, var.config
    ref_vae = RefVQVAE(vocab_size=vc.vocab_size, z_channels=vc.z_channels, ch=vc.ch,
                       share_quant_resi=vc.share_quant_resi, v_patch_nums=tuple(vc.patch_nums), test_mode=True)
    if vc.ch_mult != [1, 1, 2, 2, 4] or vc.num_res_blocks != 2:  # VAR's VQVAE hard-codes its conv stack
        dd = {"ch": vc.ch, "ch_mult": tuple(vc.ch_mult), "num_res_blocks": vc.num_res_blocks, "dropout": 0.0,
              "z_channels": vc.z_channels, "using_sa": vc.using_sa, "using_mid_sa": vc.using_mid_sa}
        ref_vae.encoder, ref_vae.decoder = RefEncoder(double_z=False, **dd), RefDecoder(**dd)
    ref_vae.load_state_dict(vae.state_dict())
    ref = RefVAR(vae_local=ref_vae, num_classes=c.num_classes, depth=c.depth, embed_dim=c.embed_dim,
                 num_heads=c.num_heads, mlp_ratio=c.mlp_ratio, norm_eps=c.norm_eps, shared_aln=c.shared_aln,
                 cond_drop_rate=0.0, attn_l2_norm=c.attn_l2_norm, patch_nums=tuple(c.patch_nums),
                 flash_if_available=False, fused_if_available=False)
    ref.load_state_dict(var.state_dict())
    return ref.to(var.device).eval()


def time_var(ref: torch.nn.Module, pipe: Pipeline, batch: int, mode: str, cfg_scale: float, top_k: int = 900,
             top_p: float = 0.96, repeats: int = 3) -> dict[str, Any]:
    """Best-of-``repeats`` seconds per image, image decode included in both, alternating runs: VAR's
    autoregressive_infer_cfg (always 2 rows per image; cfg = cfg_scale - 1) and our pipeline's mode."""
    device = pipe.gpt.device
    classes = [i % pipe.num_classes for i in range(batch)]
    top_k = min(top_k, pipe.gpt.config.vocab_size)  # VAR's sampler fails past the vocabulary
    opts = pipe.options_for(mode, cfg_scale=cfg_scale, top_k=top_k, top_p=top_p)
    var_cfg = opts.cfg_scale - 1.0

    def ours(rep: int) -> None:
        jobs = pipe.decode_batch(mode, classes, [rep * batch + i for i in range(batch)], opts)
        pipe.decode_images([j.tokens for j in jobs])

    times = alternate(device, repeats, {
        "var": lambda rep: ref.autoregressive_infer_cfg(B=batch, label_B=torch.tensor(classes, device=device),
                                                        g_seed=rep, cfg=var_cfg, top_k=top_k,
                                                        top_p=top_p if top_p < 1 else 0.0),
        "ccaserve": ours,
    })
    best = {k: min(v) / batch for k, v in times.items()}
    return {"batch": batch, "mode": mode, "cfg_scale": opts.cfg_scale, "var_cfg": var_cfg, "top_k": top_k,
            "top_p": top_p, "var_s_per_image": round(best["var"], 4),
            "ccaserve_s_per_image": round(best["ccaserve"], 4),
            "speedup": round(best["var"] / best["ccaserve"], 3), "runs_s": times}
