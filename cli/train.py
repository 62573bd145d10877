"""``ccaserve train ...``: build the embedded default model's parts, or CCA-tune a real checkpoint.

    ccaserve train all --out weights/shapes1k --work runs/shapes1k   # the shipped parts, from scratch
    ccaserve train all ... --baselines                               # + the eval's lambda sweep, DPO, unlearning
    ccaserve train cca --ref c2i_B_256.pt --codes CODES --out OUT    # CCA fine-tune of a real checkpoint
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from evaluation import evaluate
from samplers.checkpoint import (
    checkpoint_kind,
    load_gpt,
    load_var,
    load_var_vae,
    load_vq,
    read_checkpoint,
    save_pretrained,
)
from samplers.gpt import GPT_PRESETS
from samplers.pipeline import Pipeline
from samplers.var import VAR
from training import distributed, shapes
from training.extrapolation import extrapolate
from training.recipes import PAPER_LLAMAGEN, PAPER_VAR, RECIPES, cca_recipe, describe, variant_name
from training.trainers import (
    SELF_SAMPLE_SEED,
    CCATrainArgs,
    CodeData,
    GPTTrainArgs,
    RunSetup,
    VARTrainArgs,
    VARVAETrainArgs,
    VQTrainArgs,
    extract_codes,
    extract_var_codes,
    sample_codes,
    train_cca,
    train_gpt,
    train_var,
    train_var_vae,
    train_vq,
)


# ---- train ---------------------------------------------------------------------------------
def cmd_train_vq(args: argparse.Namespace) -> int:
    train_vq(args.out, args=VQTrainArgs(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed))
    print(json.dumps(json.loads((Path(args.out) / "config.json").read_text())["reconstruction"]))
    return 0


def cmd_train_codes(args: argparse.Namespace) -> int:
    data = extract_codes(load_vq(args.vq), args.num, data_seed=args.data_seed)
    data.save(args.out)
    if args.llamagen_dir:
        data.save_llamagen(args.llamagen_dir)
    print(f"wrote {len(data)} code sequences of {data.seq_len} tokens to {args.out}")
    return 0


def cmd_train_sample_codes(args: argparse.Namespace) -> int:
    pipe = Pipeline.from_registry(args.model)
    data = sample_codes(pipe, args.num, seed_base=args.seed_base, mode=args.mode, progress=not args.quiet)
    data.save(args.out)
    print(f"wrote {len(data)} sampled code sequences of {data.seq_len} tokens ({pipe.name}, {args.mode}) to {args.out}")
    return 0


def cmd_train_var_vae(args: argparse.Namespace) -> int:
    train_var_vae(args.out, args=VARVAETrainArgs(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                                 seed=args.seed), progress=not args.quiet)
    print(f"wrote {args.out}")
    return 0


def cmd_train_var_codes(args: argparse.Namespace) -> int:
    data = extract_codes(load_var_vae(args.vae), args.num, data_seed=args.data_seed)
    data.save(args.out)
    print(f"wrote {len(data)} multi-scale code sequences of {data.seq_len} tokens to {args.out}")
    return 0


def cmd_train_var(args: argparse.Namespace) -> int:
    config = {"depth": args.depth, "embed_dim": args.embed_dim, "num_heads": args.num_heads}
    model = train_var(args.out, load_var_vae(args.vae), CodeData.load(args.codes), config,
                      VARTrainArgs(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed),
                      setup=_run_setup(args))
    if model is not None:  # rank 0
        print(f"wrote {args.out}")
    return 0


def cmd_extract_codes(args: argparse.Namespace) -> int:
    env = distributed.init(args.device)
    parts = Path(args.parts) if args.parts else Path(str(args.out) + ".parts")
    data = extract_var_codes(load_var_vae(args.vae, device=env.device), args.images, flip=not args.no_flip,
                             batch_size=args.batch_size, progress=not args.quiet, parts=parts,
                             chunk_size=args.chunk_size, env=env)
    if data is not None:  # rank 0
        data.save(args.out)
        print(f"wrote {len(data)} images' codes ({data.seq_len} tokens, all scales) to {args.out} "
              f"(chunks kept in {parts} for --resume; remove them once done)")
    return 0


def cmd_train_gpt(args: argparse.Namespace) -> int:
    data = CodeData.load(args.codes)
    config = {"dim": args.dim, "n_layer": args.n_layer, "n_head": args.n_head, "block_size": data.seq_len,
              "vocab_size": args.vocab_size, "num_classes": args.num_classes}
    model = train_gpt(args.out, data, config, GPTTrainArgs(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                                           class_dropout=args.class_dropout, seed=args.seed),
                      setup=_run_setup(args), init=load_gpt(args.init) if args.init else None)
    if model is not None:  # rank 0
        print(f"wrote {args.out}")
    return 0


_RECIPE_FLAGS = ("lam", "beta", "uncond_ratio", "lr", "epochs", "batch_size", "dropout", "lr_schedule",
                 "weight_decay", "accumulate", "negatives_within")


def _preset_of(model: torch.nn.Module) -> str | None:
    c = model.config
    if isinstance(model, VAR):
        name = f"VAR-d{c.depth}"
        return name if name in PAPER_VAR and c.embed_dim == 64 * c.depth else None
    return next((name for name, p in GPT_PRESETS.items() if (p["dim"], p["n_layer"]) == (c.dim, c.n_layer)), None)


def cca_args_from(args: argparse.Namespace, ref: torch.nn.Module) -> tuple[CCATrainArgs, str]:
    """The fine-tune's settings: the recipe's (the paper's row for a LlamaGen preset; the toy one
    for anything else), then every flag given explicitly. Returns them with a line describing them."""
    preset = args.recipe_model or _preset_of(ref)
    known = preset in PAPER_LLAMAGEN or preset in PAPER_VAR
    recipe = args.recipe if args.recipe != "auto" else ("paper" if known else "toy")
    settings = cca_recipe(recipe, preset, args.target)
    overrides = {k: getattr(args, k) for k in _RECIPE_FLAGS if getattr(args, k) is not None}
    settings.update(overrides)
    line = describe(recipe, preset, args.target, settings)
    if overrides:
        line += f" (set by flags: {', '.join(sorted(overrides))})"
    return CCATrainArgs(loss=args.loss, seed=args.seed, max_steps=args.max_steps, **settings), line


def load_transformer(path: str, flag: str, vae: torch.nn.Module | None, gpt_model: str | None = None,
                     image_size: int | None = None) -> torch.nn.Module:
    """The checkpoint given as ``flag``: a LlamaGen GPT, or a VAR (which needs ``vae``, its loaded
    VQVAE from --vae), told apart by its keys."""
    if checkpoint_kind(read_checkpoint(path)[0]) == "var":
        if vae is None:
            raise SystemExit(f"error: {flag} is a VAR transformer: give its VQVAE with --vae")
        return load_var(path, vae)
    return load_gpt(path, gpt_model, image_size)


def load_reference(args: argparse.Namespace) -> torch.nn.Module:
    """--ref: a LlamaGen GPT, or a VAR (which needs --vae)."""
    vae = load_var_vae(args.vae) if args.vae else None
    return load_transformer(args.ref, "--ref", vae, args.gpt_model, args.image_size)


def cmd_train_cca(args: argparse.Namespace) -> int:
    ref = load_reference(args)
    cca_args, line = cca_args_from(args, ref)
    print(line, flush=True)
    data = CodeData.load(args.codes)
    model = train_cca(args.out, ref, data, cca_args, setup=_run_setup(args))
    if model is not None:  # rank 0
        print(f"wrote {args.out}")
    return 0


def cmd_train_extrapolate(args: argparse.Namespace) -> int:
    vae = load_var_vae(args.vae) if args.vae else None  # one VQVAE for both VAR transformers
    ref, tuned = load_transformer(args.ref, "--ref", vae), load_transformer(args.tuned, "--tuned", vae)
    try:
        model = extrapolate(ref, tuned, args.alpha)
    except ValueError as e:
        raise SystemExit(f"ccaserve train extrapolate: {e}") from None
    config = Path(args.tuned) / "config.json"  # absent for a LlamaGen .pt / VAR .pth
    meta = json.loads(config.read_text()) if config.exists() else {}
    save_pretrained(model, args.out, extra={**{k: meta[k] for k in ("train", "step") if k in meta},
                                            "extrapolation": {"alpha": args.alpha, "ref": str(args.ref)}})
    print(f"wrote {args.out}: {args.ref} + {args.alpha:g} x ({args.tuned} - {args.ref})")
    return 0


def _run_setup(args: argparse.Namespace) -> RunSetup:
    return RunSetup(grad_accum=args.grad_accum, strategy=args.strategy, precision=args.precision,
                    ckpt_every=args.ckpt_every, resume=args.resume, device=args.device,
                    snapshot_every=args.snapshot_every)


def _add_run_setup_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("execution (one process, or several under torchrun: "
                             "torchrun --nproc_per_node=N --no-python ccaserve train ...)")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per rank per step; --batch-size is the global batch")
    g.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp",
                   help="under torchrun: DDP, or FSDP2 (sharded blocks) for models that do not fit one device")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                   help="auto: bf16 autocast on CUDA, fp32 on CPU")
    g.add_argument("--ckpt-every", type=int, default=0, help="steps between resumable checkpoints (train_state.pt)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/train_state.pt when present")
    g.add_argument("--snapshot-every", type=int, default=0,
                   help="also keep the weights every N steps (OUT/snapshots/step_NNNNN/), to choose a checkpoint "
                        "on validation seeds")
    g.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available, one GPU per rank)")


def cmd_train_evalnet(args: argparse.Namespace) -> int:
    evaluate.train_evalnet(args.out, evaluate.EvalNetTrainArgs(steps=args.steps))
    print(json.dumps(json.loads((Path(args.out) / "config.json").read_text())["heldout_class_accuracy"]))
    return 0


# The recipe of the shipped default model; `train all` reproduces weights/shapes1k from nothing.
# Stage times on 2 cores are in docs/eval/README.md; every stage stays under 75 minutes.
RECIPE: dict[str, Any] = {
    "vq": {"steps": 3000, "batch_size": 16, "lr": 2e-3, "pool_size": 16000},
    "codes": {"num": 50000, "data_seeds": [0]},
    # 3M parameters (6 layers, dim 192): the largest GPT whose training and CCA epochs fit the 3-hour
    # CPU budget; see docs/eval/README.md. Stage 1: 5000 steps of 64 on the 50k images (35 min)
    "gpt": {"steps": 5000, "batch_size": 64, "lr": 2e-3},
    # stage 2: 5000 more steps on those and 150k fresh images (data seeds 1-3), a new warm-up and
    # cosine from lr 1e-3 (35 min): held-out loss 1.69 -> 1.49 nats/token, guidance-free accuracy
    # 0.70 -> 0.83 (docs/eval/README.md, "A longer-trained base")
    "codes_more": {"num": 50000, "data_seeds": [1, 2, 3]},
    "gpt_more": {"steps": 5000, "batch_size": 64, "lr": 1e-3, "seed": 10},
    # one epoch over the 50k codes in batches of 64 (781 steps). lambda 30, beta 0.05: the lowest
    # validation FID of the sweep below (docs/eval/default.md); at beta 0.1 the loss saturates
    # within ~100 steps (docs/eval/README.md)
    "cca": {**cca_recipe("toy", None, "cca"), "lam": 30.0, "beta": 0.05, "epochs": 1.0, "batch_size": 64,
            "lr": 3e-5},
    # the shipped guidance-free model is this fine-tune's weights at step 400 of 781, chosen on the
    # validation seeds among its snapshots every 100 steps: validation FID 2.28 against 2.44 for the
    # final weights at n = 10000, the same accuracy (0.892 / 0.891); docs/eval/README.md, "Choosing the
    # checkpoint"). None: the final weights
    "cca_ship_step": 400,
    # ... extrapolated along its update, ref + 1.25 x (step 400 - ref) (ExPO, training/extrapolation.py),
    # chosen on the validation seeds among alpha 0.75 / 1 / 1.25 / 1.5 / 1.75 / 2 / 2.5: FID 2.35 / 2.28 /
    # 2.07 / 2.07 / 2.04 / 1.92 / 2.41 at n = 10000, accuracy 0.884 / 0.892 / 0.896 / 0.896 / 0.895 /
    # 0.882 / 0.866: of those that keep the trained weights' accuracy, the FIDs tie within the noise and
    # the one nearest the trained weights is taken (docs/eval/README.md, "Extrapolating the fine-tune").
    # None: the snapshot as trained
    "cca_ship_alpha": 1.25,
    # ... of the run with data-order seed 1: the shipped setting was trained with seeds 0, 1 and 2 (the
    # `--baselines` restarts below, each snapshotted at step 400) and seed 1 has the lowest validation
    # FID of the three at step 400 x 1.25: 2.02 / 1.95 / 2.45 at n = 30000, accuracy 0.894 / 0.891 /
    # 0.891 (docs/eval/README.md, "Restarts of the fine-tune"). Seed 0 was shipped until 2026-12-03
    "cca_ship_seed": 1,
    # the cca fine-tunes (shipped and sweep) start from the shipped fp16 base, so they can be redone from
    # weights/ alone (the fp32 base of the first run was lost); the cca+cfg model was tuned from the fp32 one
    "cca_from_shipped_base": True,
    # (lambda, beta) pairs `--baselines` trains for the eval's sweep: lambda at beta 0.1 and 0.05,
    # beta at lambda 30
    # (lambda 300 at beta 0.05 and lambda 100 at beta 0.03: added for the two-stage base, docs/eval/README.md)
    "sweep": [[3.0, 0.1], [10.0, 0.1], [30.0, 0.1], [10.0, 0.05], [30.0, 0.05], [100.0, 0.05], [30.0, 0.02],
              [300.0, 0.05], [100.0, 0.03]],
    # training noise: fine-tunes of the sweep retrained with other data orders; those of the shipped
    # setting are the restarts its data-order seed was chosen from (seed 0 is the sweep's run)
    "training_noise": [{"lam": 10.0, "beta": 0.1, "seed": 1}, {"lam": 30.0, "beta": 0.05, "seed": 1},
                       {"lam": 30.0, "beta": 0.05, "seed": 2}],
    # hard negatives: the shipped setting with each micro-batch's labels rolled within colour groups
    # (`CCATrainArgs.negatives_within`): the tilt rebalances to CFG's but validation FID 2.81 /
    # accuracy 0.882 against 2.61 / 0.899, so not shipped (docs/eval/README.md, "Hard negatives")
    "hard_negatives": [{"lam": 30.0, "beta": 0.05, "within": "colour"}],
    # the model the cca+cfg mode guides: the paper tunes it apart, with lambda 1 and beta 0.1
    "cca_cfg": {**cca_recipe("toy", None, "cca+cfg"), "epochs": 1.0, "batch_size": 64, "lr": 3e-5},
    "evalnet": {"steps": 1500, "pool_size": 20000},
    "evalnet_heldout": 2000,
    "gpt_config": {},  # overrides of training.trainers.DEFAULT_GPT_CONFIG
    "ckpt_every": 250,  # resumable checkpoints of the long stages
    # CPU threads per stage. Float sums depend on the thread count, so "bit for bit" holds for the
    # counts the shipped weights were trained with: one thread for the small conv nets and the
    # fine-tunes (two fine-tunes run side by side on two cores, `--only`), two for the base GPT
    "threads": {"gpt": 2, "gpt_more": 2, "default": 1},
}


def _half(model: torch.nn.Module) -> torch.nn.Module:
    """Ship GPT weights in fp16 (half the bytes; loads back as fp32 on CPU)."""
    return model.to(torch.float16)


def _copy_weights(src: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("model.safetensors", "config.json"):
        data = (src / name).read_bytes()
        if not (dest / name).exists() or (dest / name).read_bytes() != data:
            (dest / name).write_bytes(data)


def _done(folder: Path) -> bool:
    return (folder / "model.safetensors").exists() and (folder / "config.json").exists()


# The small VAR of the `shapes1k-var` registry entry: VAR's multi-scale VQVAE and next-scale
# transformer on the same Shapes-1k images; its own budget (2 hours on 2 cores, docs/eval/default_var.md)
VAR_RECIPE: dict[str, Any] = {
    "var_vae": {"steps": 3000, "batch_size": 16, "lr": 2e-3, "pool_size": 16000},
    "var_codes": {"num": 50000, "data_seeds": [0]},
    # 130 tokens per image (scales 1, 2, 3, 4, 6, 8) against the GPT's 64: fewer steps for the same time.
    # The VAR trains on 200k images (data seeds 0-3, about one pass): on the 50k of seed 0 alone (4.5
    # passes) it overfit, 1.30 nats/token on them against 1.43 on fresh images; on 200k: 1.36 and 1.39,
    # and every mode samples better (docs/eval/README.md). The fine-tunes keep the 50k of seed 0, as
    # the LlamaGen default's do.
    "var_codes_more": {"num": 50000, "data_seeds": [1, 2, 3]},
    "var": {"steps": 3500, "batch_size": 64, "lr": 2e-3},
    "var_config": {},  # overrides of training.trainers.DEFAULT_VAR_CONFIG
    # the GPT's recipe (one epoch, beta 0.05) but lambda 100: the lowest validation FID of the sweep
    # on the first, 50k-image base (11.71 against 11.90 at lambda 30, accuracy 0.755 against 0.737;
    # docs/eval/default_var_base1.md), kept for this base (not re-swept); VAR-d16 in the paper trains
    # without drop-path, as here
    "cca": {**RECIPE["cca"], "lam": 100.0, "dropout": False},
    # the first (50k-image) base was swept over lambda 30 / 100 at beta 0.05 and beta 0.02 at lambda 30
    # (docs/eval/default_var_base1.md); this base over lambda 30 / 100 / 300 / 1000 (the paper's VAR-d30
    # value) at beta 0.05 and the paper's VAR beta 0.02 at lambda 100 (docs/eval/default_var.md):
    # validation FID, lambda 30 / 100 / 300 / 1000: 7.34 / 5.98 / 5.76 / 6.35, accuracy 0.788 / 0.811 /
    # 0.817 / 0.777; beta 0.02: 7.05 / 0.789. Lambda 300 and 100 tie on 5000 validation seeds (6.14 / 6.21)
    # and lambda 100 extrapolated (the shipped model) beats lambda 300 extrapolated (5.68 against 6.30)
    "sweep": [[30.0, 0.05], [100.0, 0.05], [300.0, 0.05], [1000.0, 0.05], [100.0, 0.02]],
    # the shipped guidance-free VAR is that fine-tune extrapolated along its update, base + 1.25 x (tuned -
    # base) (training/extrapolation.py), chosen on the validation seeds (n = 5000) among alpha 1 / 1.25 /
    # 1.5 / 1.75: FID 6.21 / 5.68 / 5.97 / 6.19, accuracy 0.795 / 0.807 / 0.804 / 0.796
    # (docs/eval/README.md, "Extrapolating the VAR's fine-tune")
    "cca_ship_alpha": 1.25,
    # training noise: the shipped setting retrained with another data order (validation FID 5.99,
    # accuracy 0.798 against the shipped 5.98 / 0.811; docs/eval/default_var.md)
    "training_noise": [{"lam": 100.0, "beta": 0.05, "seed": 1}],
    # hard negatives: labels rolled within colour groups, at the shipped beta and at beta 0.02:
    # validation FID 6.88 / 7.89, accuracy 0.805 / 0.789 against the shipped 5.98 / 0.811, so not
    # shipped (docs/eval/README.md, "Hard negatives on the VAR")
    "hard_negatives": [{"lam": 100.0, "beta": 0.05, "within": "colour"},
                       {"lam": 100.0, "beta": 0.02, "within": "colour"}],
    "ckpt_every": 250,
    # measured on 2 cores: var-vae ~10 min (1 thread), codes ~2.5 min per 50k images (1 thread), VAR
    # 1.08 s per step of 64 (2 threads, 3795 s), a CCA step ~3.0 s (2339-2456 s per one-epoch
    # fine-tune; 4.6-5.0 s on the 2-core machine of 2026-12-01 with keep_freed_memory, 6.3 s without;
    # DPO / unlearning 3880 / 3976 s there on 2026-12-02);
    # two fine-tunes side by side on one thread each are no faster (6.8-7.5 s per step each), so they
    # run one at a time
    "threads": {"var_vae": 1, "var_codes": 1, "var_codes_more": 1, "var": 2, "default": 2},
}

FAMILIES = ("llamagen", "var")


def _quick(recipe: dict[str, Any], family: str) -> dict[str, Any]:
    """A smoke-test size of a family's recipe (seconds per stage), for the tests."""
    recipe = json.loads(json.dumps(recipe))
    if family == "llamagen":
        recipe.update(vq={"steps": 20, "batch_size": 8, "lr": 2e-3, "pool_size": 200},
                      codes={"num": 400, "data_seeds": [0]}, gpt={"steps": 10, "batch_size": 16, "lr": 2e-3},
                      codes_more={"num": 100, "data_seeds": [1]},
                      gpt_more={"steps": 6, "batch_size": 16, "lr": 1e-3, "seed": 10},
                      evalnet={"steps": 10, "pool_size": 100}, sweep=[[30.0, 0.1]],
                      gpt_config={"dim": 64, "n_layer": 2, "n_head": 4}, evalnet_heldout=200)
        recipe["cca_cfg"].update(max_steps=3, batch_size=16)
        recipe["cca_ship_step"] = 2
        recipe["cca_ship_alpha"] = 1.25
    else:
        recipe.update(var_vae={"steps": 10, "batch_size": 8, "lr": 2e-3, "pool_size": 100},
                      var_codes={"num": 200, "data_seeds": [0]}, var_codes_more={"num": 50, "data_seeds": [1]},
                      var={"steps": 6, "batch_size": 16, "lr": 2e-3},
                      var_config={"depth": 2, "embed_dim": 64, "num_heads": 4}, sweep=[])
    recipe["cca"].update(max_steps=3, batch_size=16)
    recipe["training_noise"] = [{"lam": recipe["cca"]["lam"], "beta": recipe["cca"]["beta"], "seed": 1}]
    recipe["hard_negatives"] = [{"lam": recipe["cca"]["lam"], "beta": recipe["cca"]["beta"], "within": "colour"}]
    recipe["ckpt_every"] = 3
    return recipe


class _Stages:
    """Which stages of a recipe run (``--resume`` keeps finished ones, ``--only`` names some), the
    CPU threads each gets, and how long each took."""

    def __init__(self, args: argparse.Namespace, recipe: dict[str, Any], base: tuple[str, ...], where: str,
                 prefix: str = ""):
        self.args, self.recipe, self.base, self.where = args, recipe, base, where
        self.prefix = prefix  # of the fine-tunes' stage names: "var_" tells the VAR family's apart
        self.only = set(args.only.split(",")) if args.only else None
        self.times: dict[str, float] = {}
        # long stages save train_state.pt every few hundred steps: `--resume` continues a stopped
        # stage from there, with the same data order and random draws, so the result does not depend on stops
        self.setup = RunSetup(ckpt_every=recipe["ckpt_every"], resume=args.resume)

    def start(self, name: str, exists: bool) -> bool:
        if self.args.resume and exists:
            print(f"[{name}] found, kept (--resume)")
            return False
        if self.only is not None and name not in self.only:
            if name in self.base:  # what the named stages build on
                raise SystemExit(f"error: --only {self.args.only}: stage {name} has no output in {self.where} yet")
            return False
        threads = self.recipe["threads"]
        torch.set_num_threads(self.args.threads or threads.get(name, threads["default"]))
        self.times[name] = time.time()
        return True

    def done(self, name: str) -> None:
        self.times[name] = time.time() - self.times[name]

    def write_times(self, work: Path) -> None:
        log_file = work / "train_times.json"
        previous = json.loads(log_file.read_text()) if log_file.exists() else {}
        log_file.write_text(json.dumps({**previous, **{k: round(v, 1) for k, v in self.times.items()}}, indent=1))
        if self.times:
            print("training times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in self.times.items()))


def _variants(recipe: dict[str, Any], baselines: bool) -> list[tuple[str, float, float, int, str | None]]:
    """The fine-tunes a recipe asks for, as (loss, lambda, beta, data-order seed, negatives_within):
    the shipped one; with ``baselines`` the eval's sweep, the retrained-seed copies, the
    hard-negative variants, DPO and unlearning."""
    shipped = (recipe["cca"]["lam"], recipe["cca"]["beta"])
    ship_seed = recipe.get("cca_ship_seed", 0)
    if not baselines:
        return [("cca", *shipped, ship_seed, None)]
    variants = [("cca", lam, beta, 0, None) for lam, beta in sorted({*map(tuple, recipe["sweep"]), shipped})]
    variants += [("cca", n["lam"], n["beta"], n["seed"], None) for n in recipe["training_noise"]]
    variants += [("cca", n["lam"], n["beta"], 0, n["within"]) for n in recipe.get("hard_negatives", [])]
    variants += [("dpo", *shipped, 0, None), ("unlearn", *shipped, 0, None)]
    if ("cca", *shipped, ship_seed, None) not in variants:
        variants.insert(0, ("cca", *shipped, ship_seed, None))
    return list(dict.fromkeys(variants))


def _fine_tunes(stages: _Stages, ref: torch.nn.Module, codes: CodeData, work: Path, ship_as: Path,
                baselines: bool) -> None:
    """Every fine-tune in fp16, as shipped, so that the sweep scores exactly the shipped weights."""
    recipe = stages.recipe
    shipped = (recipe["cca"]["lam"], recipe["cca"]["beta"])
    for loss, lam, beta, seed, within in _variants(recipe, baselines):
        folder = work / variant_name(loss, lam, beta, seed, within)
        name = stages.prefix + folder.name
        # every restart of the shipped setting keeps the shipped step, so the seed's choice can be redone
        restart = loss == "cca" and (lam, beta) == shipped and not within
        is_shipped = restart and seed == recipe.get("cca_ship_seed", 0)
        ship_step = recipe.get("cca_ship_step") if restart else None
        snapshot = folder / "snapshots" / f"step_{ship_step:05d}" if ship_step else None
        kept = _done(folder) and (snapshot is None or _done(snapshot))
        trained = stages.start(name, kept)
        if trained:
            cca_args = CCATrainArgs(loss=loss, **{**recipe["cca"], "lam": lam, "beta": beta, "seed": seed,
                                                  "negatives_within": within})
            _tune(stages, ref, codes, folder, cca_args, None, snapshot_every=ship_step or 0)
        if is_shipped and (trained or kept):  # kept: e.g. trained as part of the sweep
            _ship_cca(snapshot or folder, ship_as, ref, recipe.get("cca_ship_alpha"))
        if trained:
            stages.done(name)


def _tune(stages: _Stages, ref: torch.nn.Module, codes: CodeData, folder: Path, cca_args: CCATrainArgs,
          ship_as: Path | None, snapshot_every: int = 0) -> None:
    """One fine-tune, kept in fp16 in its work folder (and as shipped, when it is)."""
    setup = replace(stages.setup, snapshot_every=snapshot_every)
    policy = _half(train_cca(folder, ref, codes, cca_args, setup=setup))
    for dest in (folder, ship_as) if ship_as is not None else (folder,):
        save_pretrained(policy, dest, extra={"train": asdict(cca_args)})


def _ship_cca(source: Path, ship_as: Path, ref: torch.nn.Module, alpha: float | None) -> None:
    """Ship the cca fine-tune (its final weights, or the recipe's snapshot) in fp16, extrapolated to
    ``base + alpha * (tuned - base)`` when the recipe sets ``alpha``. ``base`` is ``ref`` rounded to
    fp16, the shipped base, so that the step can be redone from weights/ alone."""
    meta = json.loads((source / "config.json").read_text())
    if alpha is None and "step" not in meta:  # the final weights, already fp16
        _copy_weights(source, ship_as)
        return
    model = load_var(source, ref.vae) if isinstance(ref, VAR) else load_gpt(source)
    extra = {k: meta[k] for k in ("train", "step") if k in meta}
    if alpha is not None:
        model = extrapolate(_half(copy.deepcopy(ref)).float(), model, alpha)
        extra["extrapolation"] = {"alpha": alpha, "ref": "the shipped base, in fp16"}
    save_pretrained(_half(model), ship_as, extra=extra)


def _codes_stage(stages: _Stages, name: str, tokenizer: torch.nn.Module, spec: dict[str, Any], path: Path
                 ) -> CodeData:
    """The training codes of a family: its tokenizer on the first ``num`` Shapes-1k images of each
    data seed in ``data_seeds``, in order."""
    if not stages.start(name, path.exists()):
        return CodeData.load(path)
    codes = CodeData.concat([extract_codes(tokenizer, spec["num"], seed) for seed in spec["data_seeds"]])
    codes.save(path)
    stages.done(name)
    return codes


def cmd_train_all(args: argparse.Namespace) -> int:
    """The recipes, stage by stage; with --resume, stages whose outputs exist are loaded, not redone.
    The VAR family's parts go next to the LlamaGen family's: OUT_var and WORK_var."""
    threads = torch.get_num_threads()
    out, work = Path(args.out), Path(args.work)
    families = set(FAMILIES) if args.family == "all" else {args.family}
    if args.only:  # the VAR family's stages are the ones named var*
        families &= {"var" if name.startswith("var") else "llamagen" for name in args.only.split(",")}
    try:
        if "llamagen" in families:
            _train_llamagen(args, out, work)
        if "var" in families:
            _train_var(args, out.with_name(out.name + "_var"), work.with_name(work.name + "_var"))
    finally:
        torch.set_num_threads(threads)  # the recipe sets them per stage
    return 0


def _train_llamagen(args: argparse.Namespace, out: Path, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    recipe = _quick(RECIPE, "llamagen") if args.quick else json.loads(json.dumps(RECIPE))
    stages = _Stages(args, recipe, ("vq", "codes", "gpt", "codes_more", "gpt_more"), f"{out} / {work}")
    if stages.start("vq", _done(out / "vq")):
        vq = train_vq(out / "vq", args=VQTrainArgs(**recipe["vq"]))
        stages.done("vq")
    else:
        vq = load_vq(out / "vq")
    codes = _codes_stage(stages, "codes", vq, recipe["codes"], work / "codes.npz")
    gpt = None
    if stages.start("gpt", _done(work / "gpt")):
        gpt = train_gpt(work / "gpt", codes, {**recipe["gpt_config"], "block_size": codes.seq_len},
                        GPTTrainArgs(**recipe["gpt"]), setup=stages.setup)
        stages.done("gpt")
    # the fresh images feed only the second base stage: a kept base (--resume) does not need them
    kept = args.resume and _done(work / "gpt_more") and _done(out / "gpt")
    more = None if kept else _codes_stage(stages, "codes_more", vq, recipe["codes_more"], work / "codes_more.npz")
    if stages.start("gpt_more", kept):
        gpt = train_gpt(work / "gpt_more", CodeData.concat([codes, more]), args=GPTTrainArgs(**recipe["gpt_more"]),
                        setup=stages.setup, init=gpt if gpt is not None else load_gpt(work / "gpt"))
        save_pretrained(_half(copy.deepcopy(gpt)), out / "gpt",
                        extra={"train": {"stage 1": recipe["gpt"], "stage 2": recipe["gpt_more"]}})
        stages.done("gpt_more")
    else:
        gpt = load_gpt(work / "gpt_more")  # fp32: the reference of every fine-tune
    # the fine-tunes see the first 50k images, as before the second base stage (one epoch: 781 steps)
    base = _half(copy.deepcopy(gpt)).float() if recipe["cca_from_shipped_base"] else gpt
    _fine_tunes(stages, base, codes, work, out / "cca_gpt", args.baselines)
    if stages.start("cca_cfg", _done(work / "cca_cfg") and _done(out / "cca_cfg_gpt")):
        _tune(stages, gpt, codes, work / "cca_cfg", CCATrainArgs(loss="cca", **recipe["cca_cfg"]),
              out / "cca_cfg_gpt")
        stages.done("cca_cfg")
    if stages.start("evalnet", (out / "evalnet" / "model.safetensors").exists()):
        evaluate.train_evalnet(out / "evalnet", evaluate.EvalNetTrainArgs(**recipe["evalnet"]),
                               heldout=recipe["evalnet_heldout"])
        stages.done("evalnet")
    (out / "class_names.json").write_text(json.dumps(shapes.class_names(), indent=0))
    stages.write_times(work)


def _train_var(args: argparse.Namespace, out: Path, work: Path) -> None:
    work.mkdir(parents=True, exist_ok=True)
    recipe = _quick(VAR_RECIPE, "var") if args.quick else json.loads(json.dumps(VAR_RECIPE))
    stages = _Stages(args, recipe, ("var_vae", "var_codes", "var_codes_more", "var"), f"{out} / {work}",
                     prefix="var_")
    if stages.start("var_vae", _done(out / "vae")):
        vae = train_var_vae(out / "vae", args=VARVAETrainArgs(**recipe["var_vae"]))
        stages.done("var_vae")
    else:
        vae = load_var_vae(out / "vae")
    codes = _codes_stage(stages, "var_codes", vae, recipe["var_codes"], work / "codes.npz")
    # the fresh images feed only the base VAR's training: a kept base (--resume) does not need them
    kept = args.resume and _done(work / "var") and _done(out / "var")
    more = None if kept else _codes_stage(stages, "var_codes_more", vae, recipe["var_codes_more"],
                                          work / "codes_more.npz")
    if stages.start("var", kept):
        var = train_var(work / "var", vae, CodeData.concat([codes, more]), recipe["var_config"],
                        VARTrainArgs(**recipe["var"]), setup=stages.setup)
        save_pretrained(_half(copy.deepcopy(var)), out / "var", extra={"train": recipe["var"]})
        stages.done("var")
    else:
        var = load_var(work / "var", vae)  # fp32: the reference of every fine-tune
    _fine_tunes(stages, var, codes, work, out / "cca_var", args.baselines)
    stages.write_times(work)


def add_train_commands(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train the default model's parts (vq, codes, gpt, cca, evalnet, all)")
    tsub = train.add_subparsers(dest="part", required=True)

    p = tsub.add_parser("vq", help="train a VQ tokenizer on Shapes-1k")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=RECIPE["vq"]["steps"])
    p.add_argument("--batch-size", type=int, default=RECIPE["vq"]["batch_size"])
    p.add_argument("--lr", type=float, default=RECIPE["vq"]["lr"])
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_vq)

    p = tsub.add_parser("codes", help="tokenize Shapes-1k images with a trained VQ")
    p.add_argument("--vq", required=True)
    p.add_argument("--num", type=int, default=RECIPE["codes"]["num"])
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--out", required=True, help=".npz with codes and labels")
    p.add_argument("--llamagen-dir", help="also write LlamaGen's layout (<name>_codes/i.npy, <name>_labels/i.npy)")
    p.set_defaults(func=cmd_train_codes)

    p = tsub.add_parser("sample-codes", help="a registry model's own samples as codes for `train cca` (CCA then "
                        "targets the base model's class contrast, as CFG does, instead of the data's)")
    p.add_argument("--model", default=None, help="registry name (default: the registry's default)")
    p.add_argument("--num", type=int, default=RECIPE["codes"]["num"], help="images; image i has class i mod classes")
    p.add_argument("--seed-base", type=int, default=SELF_SAMPLE_SEED, help="image i is sampled with seed base + i")
    p.add_argument("--mode", default="free", choices=("free", "cfg"),
                   help="free: the base model's own distribution (the default)")
    p.add_argument("--out", required=True, help=".npz with codes and labels")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train_sample_codes)

    p = tsub.add_parser("gpt", help="train the base AR model on extracted codes (class dropout for CFG)")
    p.add_argument("--codes", required=True, help=".npz or LlamaGen code folder")
    p.add_argument("--out", required=True)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--steps", type=int, default=RECIPE["gpt"]["steps"])
    p.add_argument("--batch-size", type=int, default=RECIPE["gpt"]["batch_size"])
    p.add_argument("--lr", type=float, default=RECIPE["gpt"]["lr"])
    p.add_argument("--class-dropout", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", default=None, help="continue from this GPT checkpoint (new warm-up and cosine; "
                   "--dim, --n-layer and the other shape flags are then taken from it)")
    _add_run_setup_args(p)
    p.set_defaults(func=cmd_train_gpt)

    p = tsub.add_parser("cca", help="fine-tune a model with CCA (or DPO / unlearning) against a frozen reference")
    p.add_argument("--ref", required=True, help="base model: safetensors dir or LlamaGen .pt (also the init)")
    p.add_argument("--codes", required=True, help=".npz or LlamaGen code folder")
    p.add_argument("--out", required=True)
    p.add_argument("--loss", choices=["cca", "dpo", "unlearn"], default="cca",
                   help="cca (the paper's loss), or its baselines dpo and unlearn")
    g = p.add_argument_group("recipe (printed at start; any flag below given explicitly overrides it)")
    g.add_argument("--recipe", choices=["auto", *RECIPES], default="auto",
                   help="paper: Table 4 of the paper for the model's LlamaGen preset (beta 0.02, lambda "
                        "1000/300/1000/1000/500 for B/L/XL/XXL/3B, lr 1e-5, batch 256, dropout on, one epoch); "
                        "authors-code: the same with the authors' code's constant lr, weight decay 0.05 and "
                        "summed micro-batch losses; toy: the embedded default model's; auto (default): paper for "
                        "a LlamaGen preset, else toy")
    g.add_argument("--recipe-model", default=None, choices=sorted(PAPER_LLAMAGEN) + sorted(PAPER_VAR),
                   help="which Table 4 row (default: --ref's preset, from its shapes)")
    g.add_argument("--target", choices=["cca", "cca+cfg"], default="cca",
                   help="tune the guidance-free model (cca) or the one the cca+cfg mode guides (lambda 1)")
    g.add_argument("--lambda", dest="lam", type=float, default=None, help="weight of the negative term")
    g.add_argument("--beta", type=float, default=None, help="scale of the implicit reward")
    g.add_argument("--uncond-ratio", type=float, default=None, help="share of rows made unconditional")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--lr-schedule", choices=["cosine", "constant"], default=None,
                   help="cosine decay (ours) or constant (the authors' code)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (ours 0, authors' 0.05)")
    g.add_argument("--accumulate", choices=["mean", "sum"], default=None,
                   help="micro-batch losses averaged (ours) or summed (the authors' code) over --grad-accum")
    g.add_argument("--epochs", type=float, default=None, help="passes over the codes")
    g.add_argument("--batch-size", type=int, default=None,
                   help="global batch: over all ranks and --grad-accum micro-batches (paper: 256)")
    g.add_argument("--negatives-within", choices=shapes.ATTRIBUTES, default=None,
                   help="Shapes-1k models: roll each micro-batch's labels within groups of classes sharing this "
                        "attribute, so most negatives differ only in the others (default: plain roll, the paper)")
    g.add_argument("--dropout", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the model's dropout on while fine-tuning (policy and reference alike), as the paper "
                        "does for LlamaGen")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps")
    p.add_argument("--seed", type=int, default=0, help="data order and unconditional rows")
    p.add_argument("--vae", default=None, help="VAR models: the VQVAE of --ref (vae_ch160v4096z32.pth)")
    p.add_argument("--gpt-model", default=None, help="GPT preset of --ref when it is a LlamaGen .pt")
    p.add_argument("--image-size", type=int, default=None)
    _add_run_setup_args(p)
    p.set_defaults(func=cmd_train_cca)

    p = tsub.add_parser("extrapolate", help="move a fine-tune further along its update: ref + alpha x (tuned - ref) "
                        "(ExPO); one forward pass per token as before")
    p.add_argument("--ref", required=True, help="the fine-tune's reference (its starting weights), safetensors dir")
    p.add_argument("--tuned", required=True, help="the fine-tune (or a snapshot of it), safetensors dir")
    p.add_argument("--alpha", type=float, required=True, help="1: the fine-tune, 0: the reference, >1: beyond it")
    p.add_argument("--vae", default=None, help="VAR models: the VQVAE of both")
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_train_extrapolate)

    p = sub.add_parser("extract-codes", help="VAR: encode an ImageNet-layout image folder with the VQVAE into "
                       "multi-scale codes for `train cca` (centre crop; the mirrored image as a second view); "
                       "resumable, and split over ranks under torchrun")
    p.add_argument("--vae", required=True, help="VAR's VQVAE (vae_ch160v4096z32.pth or a safetensors dir)")
    p.add_argument("--images", required=True, help="ROOT/CLASS/IMAGE folder; sorted class folders = labels")
    p.add_argument("--out", required=True, help=".npz of codes [N, 680], labels and the flipped view")
    p.add_argument("--no-flip", action="store_true", help="do not store the mirrored view")
    p.add_argument("--batch-size", type=int, default=16, help="images encoded together")
    p.add_argument("--chunk-size", type=int, default=1024,
                   help="images per saved chunk: a stopped run (or another rank count) resumes from the chunks")
    p.add_argument("--parts", default=None, help="folder of the finished chunks (default: OUT.parts)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available, one GPU per rank)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_extract_codes)

    p = tsub.add_parser("var-vae", help="train VAR's multi-scale VQVAE (small config) on Shapes-1k")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_var_vae)

    p = tsub.add_parser("var-codes", help="multi-scale codes of Shapes-1k images with a trained VAR VQVAE")
    p.add_argument("--vae", required=True)
    p.add_argument("--num", type=int, default=50000)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--out", required=True, help=".npz with codes [N, L] and labels")
    p.set_defaults(func=cmd_train_var_codes)

    p = tsub.add_parser("var", help="train a VAR (next-scale prediction, class dropout 0.1) on multi-scale codes")
    p.add_argument("--vae", required=True, help="its VQVAE (the scales and the next-scale inputs come from it)")
    p.add_argument("--codes", required=True, help=".npz from `train var-codes` or `extract-codes`")
    p.add_argument("--out", required=True)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--embed-dim", type=int, default=192)
    p.add_argument("--num-heads", type=int, default=6)
    p.add_argument("--steps", type=int, default=3500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    _add_run_setup_args(p)
    p.set_defaults(func=cmd_train_var)

    p = tsub.add_parser("evalnet", help="train the evaluation network on real Shapes-1k images")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=RECIPE["evalnet"]["steps"])
    p.set_defaults(func=cmd_train_evalnet)

    p = tsub.add_parser("all", help="retrain the whole default model from scratch (fixed seeds)")
    p.add_argument("--out", default="weights/shapes1k", help="shipped parts: vq, gpt, cca_gpt, cca_cfg_gpt, evalnet")
    p.add_argument("--work", default="runs/shapes1k", help="codes, fp32 base, the lambda-sweep and baseline models")
    p.add_argument("--family", choices=["all", *FAMILIES], default="all",
                   help="which default family to build: the LlamaGen one (OUT, WORK) or the small VAR "
                        "(OUT_var, WORK_var)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run of the recipe")
    p.add_argument("--resume", action="store_true", help="keep stages whose outputs already exist")
    p.add_argument("--only", default=None, metavar="STAGES",
                   help="run only these stages (comma-separated: vq, codes, gpt, codes_more, gpt_more, "
                        "cca_lam30_beta0.05, cca_lam30_beta0.05_seed1, cca_lam30_beta0.05_negcolour, "
                        "dpo_lam30_beta0.05, cca_cfg, evalnet; the "
                        "VAR family's: var_vae, var_codes, var_codes_more, var, var_cca_lam100_beta0.05, ...); "
                        "the ones they build on must exist. Lets stages run side by side")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for every stage (default: the recipe's per stage; float sums depend on "
                        "the count, so other counts do not give the shipped weights bit for bit)")
    p.add_argument("--baselines", action="store_true",
                   help="also the lambda sweep, a retrained-seed copy, hard-negative variants, DPO and unlearning "
                        "models that `ccaserve eval` compares (about 26 min each on one core; run two side by side "
                        "with --only)")
    p.set_defaults(func=cmd_train_all)

