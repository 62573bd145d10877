"""The GPU path, measured: correctness against the CPU, sampler speed per model, mode and batch,
and the server under load, in one run that writes one JSON and one markdown table.

    python benchmarks/gpu_check.py --out gpu_check                 # on a CUDA machine (< 8 min)
    python benchmarks/gpu_check.py --out gpu_check --llamagen PATH --var PATH   # + the reference samplers
    python benchmarks/gpu_check.py --cpu --out /tmp/gpu_check      # tiny models on CPU (CI runs this)

1. Correctness: greedy tokens of every mode on the device in fp32 against the CPU (GPT-B and
   VAR-d16 random weights; on --cpu the tiny models, device = cpu), and the share of token
   positions where bf16 agrees with fp32.
2. Speed: ``generate()`` per mode (free / cca cost the same; cfg / cca+cfg the same) at batch 1, 8,
   32, 128 for GPT-B/L/XL/XXL at 256 and 384 px and VAR-d16/d30, eager and compiled (GPT's static
   decoding step under torch.compile; VAR runs eager): seconds per batch, img/s, latency, peak
   memory. Cells are skipped, and said so, once the time budget is spent. LlamaGen's
   ``generate()`` and VAR's ``autoregressive_infer_cfg()`` on the same weights when checkouts are given.
3. Server: ``ccaserve serve`` on the device, ``ccaserve bench --url`` at 1, 16 and 128 clients.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from samplers import Pipeline, build_gpt, build_var, build_var_vae, generate  # noqa: E402
from samplers.gpt import GPT  # noqa: E402
from samplers.var import VAR  # noqa: E402

GPT_PRESETS_TIMED = ("GPT-B", "GPT-L", "GPT-XL", "GPT-XXL")
VAR_DEPTHS_TIMED = (16, 30)
BATCHES = (1, 8, 32, 128)


def _random_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights in place, on whatever device the model is (no host copy of GPT-XXL)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 1.0 / p.shape[-1] ** 0.5 if p.dim() >= 2 else 0.02
            if "scale_mul" in name:
                p.fill_(1.386)
            else:
                p.normal_(0.0, std, generator=gen)
    return model.eval()


def _build(kind: str, spec: Any, device: str, seed: int, vae: Any = None) -> torch.nn.Module:
    with torch.device("meta"):
        model = build_gpt(spec[0], block_size=spec[1]) if kind == "gpt" else build_var(spec)
    model = model.to_empty(device=device)
    if not isinstance(model, GPT):  # VAR's stored buffers: the scale of each position and the mask
        model.attach_vae(vae)
        level = torch.cat([torch.full((pn * pn,), i) for i, pn in enumerate(model.config.patch_nums)])
        model.lvl_1L.copy_(level.view(1, -1))
        model.attn_bias_for_masking.copy_(torch.where(level[:, None] >= level[None, :], 0.0, -torch.inf)
                                          .view(model.attn_bias_for_masking.shape))
        for block in model.blocks:
            block.attn.zero_k_bias.zero_()
    return _random_(model, seed)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- 1. correctness --------------------------------------------------------------------------
def correctness(models: dict[str, tuple[torch.nn.Module, torch.nn.Module]], device: str) -> list[dict[str, Any]]:
    """Greedy tokens of the four modes on ``device`` (fp32, and bf16) against the CPU (fp32)."""
    def to(model: torch.nn.Module, where: str | torch.dtype) -> torch.nn.Module:
        if isinstance(model, VAR) and not isinstance(where, torch.dtype):
            model.vae.to(where)  # held by the model, not a submodule
        return model.to(where)

    out = []
    for name, (base, cca) in models.items():
        for mode, model, scale in (("free", base, 1.0), ("cfg", base, 3.0), ("cca", cca, 1.0), ("cca+cfg", cca, 3.0)):
            classes, seeds = [1, 207], [0, 1]
            cpu = generate(to(model, "cpu"), classes, cfg_scale=scale, top_k=1, seeds=seeds)
            on_device = generate(to(model, device), classes, cfg_scale=scale, top_k=1, seeds=seeds).cpu()
            bf16 = None
            if device.startswith("cuda"):
                bf16 = generate(to(model, torch.bfloat16), classes, cfg_scale=scale, top_k=1, seeds=seeds).cpu()
                to(model, torch.float32)
            out.append({"model": name, "mode": mode, "device": device,
                        "fp32_equal_cpu": bool(torch.equal(cpu, on_device)),
                        "fp32_agree_fraction": round(float((cpu == on_device).float().mean()), 4),
                        "bf16_agree_fraction": None if bf16 is None else round(float((cpu == bf16).float().mean()), 4)})
            print(f"  {name:10s} {mode:8s} fp32 {device} == cpu: {out[-1]['fp32_equal_cpu']}"
                  + ("" if bf16 is None else f", bf16 agrees on {out[-1]['bf16_agree_fraction']:.1%} of tokens"),
                  flush=True)
    return out


# ---- 2. speed ---------------------------------------------------------------------------------
def time_cell(model: torch.nn.Module, batch: int, scale: float, compile: bool, device: str,
              repeats: int = 2) -> dict[str, Any]:
    classes = [i % model.config.num_classes for i in range(batch)]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    generate(model, classes, cfg_scale=scale, top_k=900, seeds=list(range(batch)), compile=compile)  # warm-up
    best = float("inf")
    for r in range(repeats):
        _sync(device)
        t = time.perf_counter()
        generate(model, classes, cfg_scale=scale, top_k=900, seeds=[r * batch + i for i in range(batch)],
                 compile=compile)
        _sync(device)
        best = min(best, time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None
    return {"batch": batch, "cfg_scale": scale, "compiled": compile, "latency_s": round(best, 4),
            "images_per_s": round(batch / best, 3), "peak_memory_mb": None if peak is None else round(peak, 1)}


def speed(specs: list[tuple[str, str, Any]], batches: tuple[int, ...], device: str, deadline: float,
          compile_too: bool) -> list[dict[str, Any]]:
    out = []
    vae = None
    for label, kind, spec in specs:
        if time.time() > deadline:
            out.append({"model": label, "skipped": "time budget spent"})
            continue
        if kind == "var" and vae is None:
            vae = _random_(build_var_vae().to(device), 5) if device.startswith("cuda") else None
        model = _build(kind, spec, device, seed=0, vae=vae if kind == "var" else None)
        if device.startswith("cuda"):
            model = model.to(torch.bfloat16)
        for batch in batches:
            for scale, modes in ((1.0, "free/cca"), (3.0, "cfg/cca+cfg")):
                for compiled in ((False, True) if compile_too and kind == "gpt" else (False,)):
                    if time.time() > deadline:
                        out.append({"model": label, "batch": batch, "modes": modes, "skipped": "time budget spent"})
                        continue
                    try:
                        cell = time_cell(model, batch, scale, compiled, device)
                    except torch.OutOfMemoryError:
                        out.append({"model": label, "batch": batch, "modes": modes, "skipped": "out of memory"})
                        torch.cuda.empty_cache()
                        continue
                    out.append({"model": label, "modes": modes, **cell})
                    print(f"  {label:12s} {modes:12s} batch {batch:3d} {'compiled' if compiled else 'eager':8s} "
                          f"{cell['latency_s']:.3f} s/batch, {cell['images_per_s']:.2f} img/s", flush=True)
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return out


# ---- 3. the server under load -----------------------------------------------------------------
def server_load(model: str, device: str, concurrency: str, duration: float, out_dir: Path) -> dict[str, Any]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "cli", "serve", "--model", model, "--device", device, "--port", str(port),
           "--no-ui", "--log-level", "warning"]
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        import httpx

        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        report = out_dir / "server_bench.json"
        subprocess.run([sys.executable, "-m", "cli", "bench", "--url", url, "--concurrency", concurrency,
                        "--duration", str(duration), "--json", str(report)], check=True, env=env)
        return json.loads(report.read_text())
    finally:
        server.terminate()
        server.wait(timeout=30)


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# GPU check ({report['device_name']}, {report['date']})", "", f"`{report['command']}`", "",
             "## Correctness (greedy tokens)", "", "| model | mode | fp32 == CPU | bf16 agreement |",
             "|---|---|---|---|"]
    for c in report["correctness"]:
        bf = "-" if c["bf16_agree_fraction"] is None else f"{c['bf16_agree_fraction']:.1%}"
        lines.append(f"| {c['model']} | {c['mode']} | {c['fp32_equal_cpu']} ({c['fp32_agree_fraction']:.1%}) | {bf} |")
    lines += ["", "## generate() speed", "", "| model | modes | batch | compiled | s / batch | img/s | peak MB |",
              "|---|---|---|---|---|---|---|"]
    for c in report["speed"]:
        if "skipped" in c:
            lines.append(f"| {c['model']} | {c.get('modes', '-')} | {c.get('batch', '-')} | - | "
                         f"skipped: {c['skipped']} | | |")
        else:
            lines.append(f"| {c['model']} | {c['modes']} | {c['batch']} | {c['compiled']} | {c['latency_s']} | "
                         f"{c['images_per_s']} | {c['peak_memory_mb'] or '-'} |")
    if report.get("server"):
        lines += ["", "## Server (`ccaserve bench --url`)", "", "| clients | img/s | statuses |", "|---|---|---|"]
        for run in report["server"]["runs"]:
            lines.append(f"| {run['concurrency']} | {run['images_per_s']} | {run['statuses']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tiny models on CPU (what CI runs)")
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--budget-s", type=float, default=420.0, help="stop timing new cells after this many seconds")
    ap.add_argument("--server-duration", type=float, default=60.0, help="seconds per client count")
    ap.add_argument("--no-compile", action="store_true", help="eager only")
    ap.add_argument("--llamagen", default=None, help="a LlamaGen checkout: also time its generate()")
    ap.add_argument("--var", default=None, help="a VAR checkout: also time its autoregressive_infer_cfg()")
    args = ap.parse_args(argv)
    start = time.time()
    cuda = torch.cuda.is_available() and not args.cpu
    device = "cuda" if cuda else "cpu"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"command": "python benchmarks/gpu_check.py " + " ".join(argv or sys.argv[1:]),
                              "date": time.strftime("%Y-%m-%d %H:%M"), "device": device,
                              "device_name": torch.cuda.get_device_name() if cuda else "cpu",
                              "torch": torch.__version__}
    print("1. correctness", flush=True)
    if cuda:
        gpt_b = Pipeline.from_registry("gpt-b-random")
        var_d16 = Pipeline.from_registry("var-d16-random")
        models = {"GPT-B": (gpt_b.gpt, gpt_b.cca_gpt), "VAR-d16": (var_d16.gpt, var_d16.cca_gpt)}
    else:
        tiny, tiny_var = Pipeline.from_registry("tiny-random"), Pipeline.from_registry("tiny-var-random")
        models = {"tiny": (tiny.gpt, tiny.cca_gpt), "tiny-var": (tiny_var.gpt, tiny_var.cca_gpt)}
    report["correctness"] = correctness(models, device)
    print("2. speed", flush=True)
    if cuda:
        specs = [(f"{p}-{px}", "gpt", (p, (px // 16) ** 2)) for px in (256, 384) for p in GPT_PRESETS_TIMED]
        specs += [(f"VAR-d{d}", "var", d) for d in VAR_DEPTHS_TIMED]
        batches = BATCHES
    else:  # tiny shapes on CPU: the timing path, not numbers anyone should quote
        import samplers.gpt as gpt_module

        gpt_module.GPT_PRESETS.setdefault("GPT-tiny", {"n_layer": 2, "n_head": 4, "dim": 64})
        specs = [("tiny-gpt", "gpt", ("GPT-tiny", 16))]
        batches = (1, 4)
    deadline = start + args.budget_s
    report["speed"] = speed(specs, batches, device, deadline, compile_too=cuda and not args.no_compile)
    references = []
    if args.llamagen and cuda:
        from benchmarks.offline import llamagen_model, time_llamagen

        gpt = _build("gpt", ("GPT-B", 576), device, 0)
        references += [{"reference": "llamagen", **time_llamagen(llamagen_model(gpt, args.llamagen), gpt, b, 1.0)}
                       for b in (1, 8)]
    if args.var and cuda:
        from benchmarks.offline import time_var, var_reference

        references += [{"reference": "var", **time_var(var_reference(var_d16, args.var), var_d16, b, "cca", 2.5)}
                       for b in (1, 8)]
    report["references"] = references
    print("3. server", flush=True)
    concurrency = "1,16,128" if cuda else "1,4"
    duration = args.server_duration if cuda else min(args.server_duration, 3.0)
    report["server"] = server_load("gpt-b-random" if cuda else "tiny-random", device, concurrency, duration, out_dir)
    report["wall_s"] = round(time.time() - start, 1)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1))
    (out_dir / "gpu_check.md").write_text(markdown(report))
    print(f"wrote {out_dir / 'gpu_check.json'} and gpu_check.md in {report['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
