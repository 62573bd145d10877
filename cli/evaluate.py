"""``ccaserve eval``, ``contrast``, ``sample-fid`` and ``fid``: measure models.

    ccaserve eval --out docs/eval                                    # metrics, sweeps, table, plot
    ccaserve contrast --cfg-scales 2,3                               # how guidance-like CCA is, per attribute
    torchrun --nproc_per_node=8 --no-python ccaserve sample-fid --gpt-ckpt c2i_L_384.pt --vq-ckpt vq_ds16_c2i.pt \\
        --mode cfg --cfg-scale 2.0 --num-images 50000 --resize 256 --out samples/L_cfg2
    ccaserve fid samples/L_cfg2.npz VIRTUAL_imagenet256_labeled.npz --inception pt_inception-2015-12-05-6726825d.pth
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from evaluation import contrast, evaluate
from samplers.checkpoint import load_gpt, load_var
from samplers.modes import normalize_mode
from samplers.registry import Registry
from training import distributed
from training.recipes import parse_variant_name
from training.trainers import CodeData, extract_codes

from .common import add_model_args, add_sampling_args, float_list, pipeline_from_args, sampling_options


# ---- eval ----------------------------------------------------------------------------------
def cmd_eval(args: argparse.Namespace) -> int:
    """Choices on the validation seeds, the table on the test seeds (see evaluation.evaluate.SPLITS).

    Validation: free, every CFG scale, every cca+cfg scale, and every fine-tune in --work (the lambda
    sweep, DPO, unlearning); the CFG and cca+cfg scales with the lowest validation FID are picked.
    Test: free, cfg and cca+cfg at the picked scales and the shipped cca, each over --test-repeats
    independent seed sets, reported as mean and std, with the share of CFG's gain that CCA closes."""
    if args.add_to:
        return cmd_eval_add(args)
    if args.rescore_shipped:
        raise ValueError("--rescore-shipped rescores an earlier report: give it with --add-to REPORT.json")
    pipe = pipeline_from_args(args)
    net = load_evalnet_for(args.model, args.evalnet)
    ref = evaluate.reference_stats(net, args.n_ref, progress=not args.quiet)
    opts = sampling_options(args)
    entries: list[dict[str, Any]] = []
    run = _runner(pipe, net, ref, opts, entries, n=args.n, n_val=args.n_val, quiet=args.quiet)

    real = evaluate.real_data_metrics(net, ref, args.n)
    print(f"real images: fid {real['fid']:.3f} is {real['is']:.2f} acc {real['accuracy']:.3f} "
          f"(the floor at n={args.n})")
    recon = evaluate.reconstruction_metrics(net, ref, pipe.family, args.n)
    print(f"VQ reconstructions of real images: fid {recon['fid']:.3f} is {recon['is']:.2f} "
          f"acc {recon['accuracy']:.3f} (the tokenizer's ceiling)")

    # validation: every setting; the choices are made here only
    val = "validation"
    run(val, "free", "free", "base", n=args.n_val)
    cfg_val = [run(val, "cfg", "cfg scale (base)", "base", cfg_scale=s, n=args.n_val) for s in args.cfg_scales]
    run(val, "cca", "cca (shipped)", "cca", n=args.n_val)
    cca_cfg_label = "cca_cfg" if pipe.cca_cfg_gpt is not None else "cca"  # its own fine-tune, when shipped
    cca_cfg_val = [run(val, "cca+cfg", "cfg scale (cca+cfg)", cca_cfg_label, cfg_scale=s, n=args.n_val)
                   for s in args.cca_cfg_scales]
    best_cfg = min(cfg_val, key=lambda e: e["fid"])["cfg_scale"] if cfg_val else pipe.default_cfg_scale
    best_cca_cfg = min(cca_cfg_val, key=lambda e: e["fid"])["cfg_scale"] if cca_cfg_val else best_cfg
    chosen = {"cfg_scale": best_cfg, "cca_cfg_scale": best_cca_cfg}
    print(f"chosen on validation: cfg scale {best_cfg:g}, cca+cfg scale {best_cca_cfg:g}", flush=True)

    # test: the chosen settings on fresh seed sets
    for rep in range(args.test_repeats):
        run("test", "free", "free", "base", seed_set=rep)
        run("test", "cfg", "cfg (chosen scale)", "base", cfg_scale=best_cfg, seed_set=rep)
        run("test", "cca", "cca (shipped)", "cca", seed_set=rep)
        run("test", "cca+cfg", "cca+cfg (chosen scale)", cca_cfg_label, cfg_scale=best_cca_cfg, seed_set=rep)
    _score_fine_tunes(run, pipe, args.work, entries)
    report = {"model": pipe.name, "n": args.n, "n_val": args.n_val, "n_ref": args.n_ref,
              "reference_seed": ref.seed, "splits": evaluate.SPLITS, "real": real,
              "vq_reconstruction": recon, "options": opts, "chosen_on_validation": chosen,
              "test": evaluate.test_summary([e for e in entries if e["split"] == "test"]), "entries": entries,
              "date": time.strftime("%Y-%m-%d"), "command": "ccaserve " + " ".join(args.argv)}
    _write_report(report, Path(args.out), args.name)
    print(evaluate.summary_markdown(report["test"]))
    return 0


def _runner(pipe: Any, net: evaluate.EvalNet, ref: Any, opts: dict[str, Any], entries: list[dict[str, Any]],
            n: int, n_val: int, quiet: bool) -> Any:
    """The one way eval scores a setting: sample a mode on a split's seeds, score it, print a line and
    append the entry. ``n`` samples by default; ``n=None`` in a call means the validation size."""

    def run(split: str, mode: str, sweep: str, model_label: str, cfg_scale: float | None = None, seed_set: int = 0,
            n: int | None = n, **meta: Any) -> dict[str, Any]:
        scale = {} if cfg_scale is None else {"cfg_scale": cfg_scale}
        e = evaluate.evaluate_mode(pipe, net, ref, mode, n_val if n is None else n,
                                   seed_base=evaluate.split_seed_base(split, seed_set), progress=not quiet,
                                   **opts, **scale)
        e = evaluate.finish_entry(e, split=split, seed_set=seed_set, sweep=sweep, model=model_label, **meta)
        print(f"[{split} {seed_set}] {mode:8s} {model_label:18s} {e['setting']:8s} fid {e['fid']:8.3f}  "
              f"is {e['is']:7.2f}  acc {e['accuracy']:.3f} (shape {e['shape_accuracy']:.3f} colour "
              f"{e['colour_accuracy']:.3f} texture {e['texture_accuracy']:.3f})  ({e['sample_seconds']:.0f}s)",
              flush=True)
        entries.append(e)
        return e

    return run


def load_evalnet_for(model: str | None, evalnet: str | None = None) -> evaluate.EvalNet:
    """The evaluation network at ``evalnet`` (--evalnet), or registry ``model``'s own."""
    if evalnet:
        net_path = Path(evalnet)
    else:
        entry = Registry().get(model)
        net_path = entry.weights_dir / entry.parts.get("evalnet", {}).get("path", "")
    if not (net_path / "config.json").exists():
        raise FileNotFoundError(f"no evaluation network at {net_path} (pass --evalnet DIR)")
    return evaluate.load_evalnet(net_path)


def _score_fine_tunes(run: Any, pipe: Any, work: str | None, entries: list[dict[str, Any]]) -> None:
    """The fine-tunes in ``work`` (the lambda sweep, retrained-seed copies, DPO, unlearning) on the
    validation seeds, each as the pipeline's cca model; those ``entries`` already hold are skipped.
    After the test split: they only inform the choice of the shipped lambda, which `train all` makes."""
    folder = Path(work) if work else None
    def order(path: Path) -> tuple[Any, ...]:  # no hard-negative attribute sorts first
        *rest, within = parse_variant_name(path.name)
        return (*rest, within or "")

    variants = sorted((p for p in folder.glob("*_lam*_beta*") if (p / "model.safetensors").exists()),
                      key=order) if folder is not None and folder.exists() else []
    shipped = pipe.cca_gpt
    scored = {e["model"] for e in entries if e["split"] == "validation"}
    for variant in variants:
        loss, lam, beta, train_seed, within = parse_variant_name(variant.name)
        if loss != "cca":
            sweep = loss
        elif within:
            sweep = "hard negatives (cca)"
        else:
            sweep = f"lambda (cca, β={beta:g})" if train_seed == 0 else "training seed (cca)"
        label = (f"{loss} λ={lam:g} β={beta:g}" + (f" seed={train_seed}" if train_seed else "")
                 + (f" within {within}" if within else ""))
        if label in scored:
            continue
        model = load_tuned(variant, pipe)
        meta = {"lambda": lam, "beta": beta, "loss": loss, "train_seed": train_seed, "negatives_within": within}
        if _same_weights(model, shipped):  # the shipped model: same seeds, same samples, same scores
            first = next(e for e in entries if e["sweep"] == "cca (shipped)" and e["split"] == "validation")
            entries.append({**first, "sweep": sweep, "model": label, **meta,
                            "setting": evaluate.settings_label({"sweep": sweep, **meta})})
            continue
        pipe.models["cca"] = model
        run("validation", "cca", sweep, label, n=None, **meta)
    pipe.models["cca"] = shipped


def _write_report(report: dict[str, Any], out: Path, name: str) -> None:
    """The sweep's pick and the training noise from the entries, then NAME.json, .md and the FID-IS plot."""
    entries = report["entries"]
    lambda_rows = [e for e in entries if e["sweep"].startswith("lambda (cca")]
    best_row = min(lambda_rows, key=lambda e: e["fid"]) if lambda_rows else {}
    report["chosen_on_validation"]["lambda_by_validation_fid"] = best_row.get("lambda")
    report["chosen_on_validation"]["beta_by_validation_fid"] = best_row.get("beta")
    reseeded = [e for e in entries if e["sweep"] == "training seed (cca)"]
    reseeded_settings = {(r["lambda"], r["beta"]) for r in reseeded}
    training_seed = [e for e in lambda_rows if (e["lambda"], e["beta"]) in reseeded_settings] + reseeded
    report["noise"] = {"what": "std over the test seed sets of each mode's metrics (in 'test'); training noise: a "
                               "fine-tune of the sweep retrained with other data-order seeds, scored on the "
                               "validation seeds",
                       "training_seed_fid": [{"model": e["model"], "fid": e["fid"], "accuracy": e["accuracy"]}
                                             for e in training_seed]}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report, indent=1))
    (out / f"{name}.md").write_text(_eval_markdown(report))
    evaluate.plot_fid_is([e for e in entries if e["split"] == "validation"], out / f"{name}_fid_is.png",
                         title=f"{report['model']}: CFG scale sweep vs CCA lambda sweep (validation seeds)")
    print(f"wrote {out / (name + '.json')}, {name}.md, {name}_fid_is.png")


def cmd_eval_add(args: argparse.Namespace) -> int:
    """``eval --add-to REPORT.json``: score the fine-tunes in --work that the report lacks, on its
    validation seeds with its settings, and rewrite it. Its test split is kept as it is."""
    path = Path(args.add_to)
    report = json.loads(path.read_text())
    pipe = pipeline_from_args(args)
    opts = sampling_options(args)
    if report["model"] != pipe.name or report["options"] != opts:
        raise ValueError(f"{path} scores {report['model']} with {report['options']}; this run would score "
                         f"{pipe.name} with {opts}: give the report's --model and sampling flags")
    net = load_evalnet_for(args.model, args.evalnet)
    ref = evaluate.reference_stats(net, report["n_ref"], seed=report["reference_seed"], progress=not args.quiet)
    entries = report["entries"]
    before = len(entries)

    run = _runner(pipe, net, ref, opts, entries, n=report["n_val"], n_val=report["n_val"], quiet=args.quiet)
    rescored = None
    if args.rescore_shipped:  # its rows go where the old ones were, not to the end
        rescored = _rescore_shipped(_runner(pipe, net, ref, opts, [], n=report["n"], n_val=report["n_val"],
                                            quiet=args.quiet), report)
    _score_fine_tunes(run, pipe, args.work, entries)
    report.setdefault("added", []).append({"date": time.strftime("%Y-%m-%d"),
                                           "command": "ccaserve " + " ".join(args.argv),
                                           "models": [e["model"] for e in entries[before:]],
                                           **({"rescored": rescored, "shipped": _shipped_cca(args)}
                                              if rescored else {})})
    _write_report(report, path.parent, path.stem)
    return 0


def _shipped_cca(args: argparse.Namespace) -> str:
    """What the shipped cca model is, from its config.json: the fine-tune's setting, the step it was
    taken at and its extrapolation, so a report's rescore records say which model each one scored."""
    if args.cca_ckpt:
        folder = Path(args.cca_ckpt)
    else:
        entry = Registry().get(args.model)
        folder = entry.weights_dir / entry.parts["cca_gpt"].get("path", "")
    config = folder / "config.json" if folder.is_dir() else None
    if config is None or not config.exists():
        return str(folder)
    meta = json.loads(config.read_text())
    train = meta.get("train", {})
    text = f"λ {train['lam']:g}, β {train['beta']:g}" if "lam" in train and "beta" in train else folder.name
    if train.get("seed"):
        text += f", data-order seed {train['seed']}"
    if "step" in meta:
        text += f", step {meta['step']}"
    if "extrapolation" in meta:
        text += f", extrapolated ×{meta['extrapolation']['alpha']:g} along its update"
    return text


def _rescore_shipped(run: Any, report: dict[str, Any]) -> str:
    """The shipped cca model changed and nothing else did: score it again on the report's validation
    seeds and on each of its test seed sets, in place of its old rows (kept under ``replaced``), and
    redo the test summary. Where the cca+cfg mode guides that same model (no separate cca+cfg
    fine-tune, as for the VAR), its rows are redone too and its scale is chosen again on validation.
    The other rows stay valid: same base, same seeds, same settings. Returns what was rescored."""
    entries = report["entries"]

    def guides_shipped(e: dict[str, Any]) -> bool:
        return e["mode"] == "cca+cfg" and e["model"] == "cca"

    old = [(i, e) for i, e in enumerate(entries) if e["sweep"] == "cca (shipped)" or guides_shipped(e)]
    if not any(e["sweep"] == "cca (shipped)" for _, e in old):
        raise ValueError("the report has no rows of the shipped cca model to rescore")
    for i, e in old:  # validation first: it chooses the cca+cfg scale the test rows use
        if e["split"] == "validation":
            scale = {"cfg_scale": e["cfg_scale"]} if guides_shipped(e) else {}
            entries[i] = run("validation", e["mode"], e["sweep"], e["model"], seed_set=e["seed_set"], n=None, **scale)
    guided = [entries[i] for i, e in old if guides_shipped(e) and e["split"] == "validation"]
    if guided:
        report["chosen_on_validation"]["cca_cfg_scale"] = min(guided, key=lambda e: e["fid"])["cfg_scale"]
    for i, e in old:  # n: the runner's test size
        if e["split"] == "test":
            scale = {"cfg_scale": report["chosen_on_validation"]["cca_cfg_scale"]} if guides_shipped(e) else {}
            entries[i] = run("test", e["mode"], e["sweep"], e["model"], seed_set=e["seed_set"], **scale)
    report.setdefault("replaced", []).append({"date": time.strftime("%Y-%m-%d"), "entries": [e for _, e in old]})
    report["test"] = evaluate.test_summary([e for e in entries if e["split"] == "test"])
    return "cca (shipped)" + (" and cca+cfg, which guides it" if guided else "")


# ---- contrast ------------------------------------------------------------------------------
def cmd_contrast(args: argparse.Namespace) -> int:
    pipe = pipeline_from_args(args)
    tuned = {"cca": pipe.cca_gpt} if pipe.cca_gpt is not None else {}
    if pipe.cca_cfg_gpt is not None:
        tuned["cca+cfg model"] = pipe.cca_cfg_gpt
    like = next(pipe.gpt.parameters())
    for path in args.also:
        tuned[Path(path).name] = load_tuned(path, pipe).to(like.device, like.dtype)
    if args.codes:
        data = CodeData.load(args.codes)
        if args.n and args.n < len(data):
            data = CodeData(data.codes[: args.n].numpy(), data.labels[: args.n].numpy())
        source = f"codes from {args.codes}"
    else:
        data = extract_codes(pipe.vq, args.n, data_seed=contrast.CONTRAST_DATA_SEED, progress=not args.quiet)
        if data.seq_len != pipe.gpt.config.block_size:
            raise ValueError(f"this model's VQ turns Shapes-1k images into {data.seq_len} codes, its GPT expects "
                             f"{pipe.gpt.config.block_size}: pass --codes (a LlamaGen code folder or .npz)")
        source = f"held-out Shapes-1k images (data seed {contrast.CONTRAST_DATA_SEED}) tokenized by the model's VQ"
    if int(data.labels.max()) >= pipe.num_classes:
        raise ValueError(f"--codes has class {int(data.labels.max())}, the model has {pipe.num_classes} classes")
    gen = torch.Generator().manual_seed(0)
    negatives = {"rolled (as trained)": contrast.rolled_negatives(data.labels, gen)}
    if not args.codes:
        negatives.update(contrast.attribute_negatives(data.labels, gen))
    report = contrast.reward_contrast(pipe.gpt, tuned, data.codes, data.labels, negatives,
                                      cfg_scales=args.cfg_scales or [pipe.default_cfg_scale],
                                      batch_size=args.batch_size, progress=not args.quiet)
    print(contrast.markdown_table(report))
    meta = {"model": pipe.name, "n": len(data), "data": source, "command": "ccaserve " + " ".join(args.argv)}
    paths = contrast.write_report(report, args.out, args.name, meta)
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def load_tuned(path: str | Path, pipe: Any) -> torch.nn.Module:
    """A fine-tune of the pipeline's base model, in its family's layout (VAR's needs the VQVAE)."""
    return load_var(path, pipe.vq) if pipe.family.name == "var" else load_gpt(path)


def _same_weights(a: torch.nn.Module | None, b: torch.nn.Module | None) -> bool:
    if a is None or b is None:
        return False
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _eval_markdown(report: dict[str, Any]) -> str:
    chosen = report["chosen_on_validation"]
    splits = report["splits"]
    lines = [f"# Evaluation: {report['model']} ({report['date']})", "",
             f"`{report['command']}`", "",
             f"Reference: {report['n_ref']} held-out real images (seed {report['reference_seed']}). Real held-out "
             f"images score FID {report['real']['fid']:.3f}, accuracy {report['real']['accuracy']:.3f} at n = "
             f"{report['n']} (the floor); their VQ reconstructions FID {report['vq_reconstruction']['fid']:.3f}, "
             f"accuracy {report['vq_reconstruction']['accuracy']:.3f} (the tokenizer's ceiling for any AR model on "
             "its codes).", "",
             f"Seeds: validation = image seeds from {splits['validation']} ({report['n_val']} per setting): every "
             f"setting, and the choices; test = image seeds from {splits['test']} ({report['n']} per seed set), "
             "only the chosen settings. Chosen on validation FID: "
             f"cfg scale {chosen['cfg_scale']:g}, cca+cfg scale {chosen['cca_cfg_scale']:g}"
             + (f"; the sweep's best is λ={chosen['lambda_by_validation_fid']:g}, "
                f"β={chosen['beta_by_validation_fid']:g}"
                if chosen.get("lambda_by_validation_fid") is not None else "") + ".", "",
             "## Test split (mean ± std over the seed sets)", "",
             evaluate.summary_markdown(report["test"]), ""]
    seeds = report["noise"].get("training_seed_fid") or []
    if len(seeds) > 1:
        lines += ["Training noise (one fine-tune of the sweep retrained with other data-order seeds; validation "
                  "seeds): "
                  + ", ".join(f"{s['model']}: FID {s['fid']:.2f}, accuracy {s['accuracy']:.3f}" for s in seeds), ""]
    for added in report.get("added", []):
        if added.get("rescored"):
            lines += ["The shipped cca model was replaced"
                      + (f" ({added['shipped']})" if added.get("shipped") else "")
                      + f" and its rows rescored ({added['date']}), by "
                      f"`{added['command']}`: validation and test rows of {added['rescored']} (the old rows are "
                      "kept under `replaced` in the JSON)"
                      + (f"; validation rows added: {', '.join(added['models'])}" if added["models"] else "") + ".", ""]
            continue
        lines += [f"Validation rows added later ({added['date']}), by `{added['command']}`: "
                  + (", ".join(added["models"]) or "none") + ".", ""]
    lines += ["## Validation split: every setting", "",
              evaluate.markdown_table([e for e in report["entries"] if e["split"] == "validation"]), ""]
    return "\n".join(lines)


def cmd_sample_fid(args: argparse.Namespace) -> int:
    from evaluation.sample_fid import sample_fid

    env = distributed.init(args.device)
    args.device = str(env.device)
    pipe = pipeline_from_args(args)
    args.mode = normalize_mode(args.mode)
    if args.mode not in pipe.modes:
        raise ValueError(f"mode {args.mode!r} is not offered by this model (modes: {pipe.modes})")
    model = {k: getattr(args, k) for k in ("model", "gpt_ckpt", "cca_ckpt", "cca_cfg_ckpt", "vq_ckpt", "gpt_model",
                                           "vq_model", "image_size", "precision") if getattr(args, k) is not None}
    out = sample_fid(pipe, args.out, mode=args.mode, num_images=args.num_images, batch_size=args.per_proc_batch_size,
                     global_seed=args.global_seed, resize=args.resize, pack=not args.no_npz, npz=args.npz, env=env,
                     progress=not args.quiet, settings={"model": model or {"model": pipe.name}},
                     **sampling_options(args))
    if env.is_main:
        print(f"{args.num_images} images in {args.out}" + (f", packed to {out}" if out else ""))
    return 0


def cmd_fid(args: argparse.Namespace) -> int:
    from evaluation.fid import batch_metrics, load_batch
    from evaluation.inception import load_inception

    device = args.device
    net = load_inception(args.inception, device)
    result = batch_metrics(net, load_batch(args.samples), load_batch(args.reference), batch_size=args.batch_size,
                           pr_n=args.pr_n, progress=not args.quiet)
    result.update(samples=str(args.samples), reference=str(args.reference), inception=str(args.inception))
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


def add_eval_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="FID / IS / precision / recall / accuracy per mode, with CFG and lambda sweeps")
    p.add_argument("--n", type=int, default=5000, help="test samples per seed set and mode (class-balanced)")
    p.add_argument("--n-val", type=int, default=2000, help="validation samples per setting")
    p.add_argument("--test-repeats", type=int, default=3, help="independent test seed sets (the noise)")
    p.add_argument("--n-ref", type=int, default=10000, help="held-out real images for the reference statistics")
    p.add_argument("--cfg-scales", type=float_list, default=[1.5, 2.0, 3.0, 4.0, 6.0])
    p.add_argument("--cca-cfg-scales", type=float_list, default=[1.5, 2.0, 3.0])
    p.add_argument("--work", default="runs/shapes1k", help="folder of lambda-sweep / dpo / unlearn models")
    p.add_argument("--evalnet", default=None, help="evaluation network dir (default: the model's)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", default="docs/eval")
    p.add_argument("--name", default="default", help="output file stem")
    p.add_argument("--add-to", default=None, metavar="REPORT.json",
                   help="only score the fine-tunes in --work that this earlier report lacks, on its validation "
                        "seeds and settings, and rewrite it (json, md, plot); its test split is kept")
    p.add_argument("--rescore-shipped", action="store_true",
                   help="with --add-to: the shipped cca model changed (nothing else did); score it again on the "
                        "report's validation and test seeds in place of its old rows, which are kept under 'replaced'")
    add_sampling_args(p, guidance=False)
    add_model_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("contrast", help="how guidance-like a fine-tune is: its reward contrast vs the base model's "
                       "class contrast, per kind of negative (effective guidance scale)")
    p.add_argument("--n", type=int, default=2000, help="real images (Shapes-1k held-out, or the first N of --codes)")
    p.add_argument("--codes", default=None, help=".npz or LlamaGen code folder (default: tokenize held-out "
                   "Shapes-1k images, which also adds shape / colour / texture negatives)")
    p.add_argument("--also", action="append", default=[],
                   help="another fine-tune of the model (GPT or VAR dir) to compare (repeatable)")
    p.add_argument("--cfg-scales", type=float_list, default=None,
                   help="CFG scales measured alongside, as the distribution CFG samples from (default: the model's)")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", default="docs/eval")
    p.add_argument("--name", default="contrast", help="output file stem")
    add_model_args(p)
    p.set_defaults(func=cmd_contrast)

    p = sub.add_parser("sample-fid", help="sample an evaluation set (PNG folder + ADM .npz); resumable, torchrun-ready",
                       description="Image i has class i %% num_classes and a seed from (--global-seed, i), so "
                       "any number of ranks writes the same images; a rerun draws only the missing ones. "
                       "Under torchrun each rank takes every WORLD_SIZE-th missing index (NCCL on GPUs, gloo "
                       "on CPU).")
    p.add_argument("--mode", default="cca", help="free, cfg, cca or cca+cfg")
    p.add_argument("--num-images", type=int, default=50000)
    p.add_argument("--per-proc-batch-size", type=int, default=32, help="images per decoding batch on each rank")
    p.add_argument("--global-seed", type=int, default=0)
    p.add_argument("--out", required=True, help="PNG folder ({i:06d}.png); the npz goes to OUT.npz")
    p.add_argument("--npz", default=None, help="npz path (default: OUT.npz)")
    p.add_argument("--no-npz", action="store_true", help="write the PNGs only")
    p.add_argument("--resize", type=int, default=None, help="resize samples (bicubic), e.g. 256 for 384-px models")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_sampling_args(p)
    add_model_args(p)
    p.set_defaults(func=cmd_sample_fid)

    p = sub.add_parser("fid", help="FID / sFID / IS / precision / recall of a sample npz against a reference npz "
                       "(ADM layout) with a local FID Inception-v3 weights file")
    p.add_argument("samples", help=".npz with arr_0 uint8 [N, H, W, 3] (e.g. from sample-fid)")
    p.add_argument("reference", help=".npz with arr_0 and/or mu, sigma (e.g. VIRTUAL_imagenet256_labeled.npz)")
    p.add_argument("--inception", required=True,
                   help="local FID Inception weights (pt_inception-2015-12-05-6726825d.pth); never downloaded")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--pr-n", type=int, default=None,
                   help="images per side for precision/recall (default: all of them, as ADM; 0: skip)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_fid)
