"""torchrun on CPU (gloo, 2 processes): sample-fid ranks and resumption, DDP / FSDP training steps,
training checkpoints, and ``ccaserve fid``."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cli import main
from evaluation.inception import FIDInception, load_inception
from samplers import load_gpt, save_pretrained
from tests.conftest import random_gpt
from tests.server_util import write_tiny_models
from tests.test_training import _tiny_codes
from training.trainers import CCATrainArgs, RunSetup, train_cca

# one intra-op thread everywhere: float results (and so sampled tokens) depend on the thread count,
# and torchrun gives each rank one thread
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _ccaserve(*args: str) -> list[str]:
    return [sys.executable, "-m", "cli", *args]


def _torchrun(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "cli", *args]


def _run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def _pngs(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def _descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (torchrun starts its workers in their own sessions)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _kill_tree(pid: int) -> None:
    for p in [pid, *_descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sample_fid_two_ranks_equal_one_and_resume_after_kill(tmp_path):
    paths = write_tiny_models(tmp_path / "models", block_size=64)
    model = ["--gpt-ckpt", str(paths["gpt"]), "--cca-ckpt", str(paths["cca"]), "--vq-ckpt", str(paths["vq"])]
    n = 48
    common = ["sample-fid", *model, "--mode", "cca+cfg", "--num-images", str(n), "--per-proc-batch-size", "2",
              "--quiet"]
    _run(_ccaserve(*common, "--out", "one"), tmp_path)
    one = _pngs(tmp_path / "one")
    assert len(one) == n and list(one)[0] == "000000.png" and list(one)[-1] == f"{n - 1:06d}.png"

    # two ranks, killed (SIGKILL) part-way through
    proc = subprocess.Popen(_torchrun(*common, "--out", "two"), cwd=tmp_path, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(list((tmp_path / "two").glob("*.png"))) < 6 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    _kill_tree(proc.pid)  # the launcher and both ranks at once, as a preempted job
    proc.wait()
    time.sleep(0.5)
    partial = len(list((tmp_path / "two").glob("*.png")))
    assert 0 < partial < n, f"the kill came at {partial} of {n} images: not mid-run"
    assert not (tmp_path / "two.npz").exists()

    resumed = _run(_torchrun(*common, "--out", "two"), tmp_path)
    assert f"resuming: {partial} of {n} images exist" in resumed.stdout + resumed.stderr
    two = _pngs(tmp_path / "two")
    assert two.keys() == one.keys()  # no index skipped, none extra
    assert all(two[k] == one[k] for k in one), "2 ranks (killed and resumed) drew other images than 1 rank"
    assert not list((tmp_path / "two").glob("*.tmp"))
    a, b = np.load(tmp_path / "one.npz")["arr_0"], np.load(tmp_path / "two.npz")["arr_0"]
    assert a.dtype == np.uint8 and a.shape == (n, 16, 16, 3) and np.array_equal(a, b)
    # class-balanced labels: image i is class i % 10 (its seed fixed by the index)
    manifest = json.loads((tmp_path / "two" / "sample_fid.json").read_text())
    assert manifest["labels"] == "index % num_classes" and manifest["num_classes"] == 10

    # resize (bicubic) for the npz the ADM evaluator reads at 256 from 384-px models
    _run(_ccaserve(*common[:-1], "--num-images", "4", "--out", "big", "--resize", "24", "--quiet"), tmp_path)
    assert np.load(tmp_path / "big.npz")["arr_0"].shape == (4, 24, 24, 3)
    # the same folder with other settings is refused, not mixed
    bad = _run(_ccaserve(*common, "--out", "two", "--cfg-scale", "2.5"), tmp_path, check=False)
    assert bad.returncode == 2 and "other settings" in bad.stderr


def _train_cca_cmd(ref: Path, codes: Path, out: str, *extra: str) -> list[str]:
    return ["train", "cca", "--ref", str(ref), "--codes", str(codes), "--out", out, "--batch-size", "8",
            "--max-steps", "2", "--lr", "1e-3", "--lambda", "10", "--beta", "0.1", "--uncond-ratio", "0.25",
            *extra]


def _max_diff(a: Path, b: Path) -> float:
    sa, sb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


def test_ddp_and_fsdp_cca_steps_equal_single_process_accumulation(tmp_path):
    save_pretrained(random_gpt(0), tmp_path / "ref")
    _tiny_codes().save(tmp_path / "codes.npz")
    ref, codes = tmp_path / "ref", tmp_path / "codes.npz"
    _run(_torchrun(*_train_cca_cmd(ref, codes, "ddp")), tmp_path)
    _run(_torchrun(*_train_cca_cmd(ref, codes, "fsdp", "--strategy", "fsdp")), tmp_path)
    _run(_ccaserve(*_train_cca_cmd(ref, codes, "accum", "--grad-accum", "2")), tmp_path)
    _run(_ccaserve(*_train_cca_cmd(ref, codes, "whole")), tmp_path)
    assert _max_diff(tmp_path / "ddp", ref) > 1e-3  # it trained
    # 2 ranks x 1 micro-batch of 4 == 1 process x 2 micro-batches of 4 (negatives rolled within each)
    assert _max_diff(tmp_path / "ddp", tmp_path / "accum") <= 1e-6
    assert _max_diff(tmp_path / "fsdp", tmp_path / "accum") <= 1e-6
    # rolling over the whole batch of 8 is a different objective: the comparison can tell
    assert _max_diff(tmp_path / "whole", tmp_path / "accum") > 1e-5
    log = json.loads((tmp_path / "ddp" / "train_log.json").read_text())
    assert log["args"]["world_size"] == 2 and {"loss", "reward_acc", "margin"} <= log["history"][-1].keys()


def test_ddp_gpt_step_equals_single_process_accumulation(tmp_path):
    _tiny_codes().save(tmp_path / "codes.npz")
    cmd = ["train", "gpt", "--codes", "codes.npz", "--batch-size", "8", "--steps", "2", "--dim", "64",
           "--n-layer", "2", "--n-head", "4", "--vocab-size", "64", "--num-classes", "10"]
    _run(_torchrun(*cmd, "--out", "ddp"), tmp_path)
    _run(_ccaserve(*cmd, "--out", "accum", "--grad-accum", "2"), tmp_path)
    assert _max_diff(tmp_path / "ddp", tmp_path / "accum") <= 1e-6


class _Crash(RuntimeError):
    pass


def test_training_resumes_from_checkpoint_after_a_crash(tmp_path, monkeypatch):
    ref, data = random_gpt(0), _tiny_codes()
    args = CCATrainArgs(lam=10.0, beta=0.1, lr=1e-3, batch_size=16, max_steps=5, uncond_ratio=0.2)
    whole = train_cca(tmp_path / "whole", ref, data, args, progress=False)

    step = torch.optim.AdamW.step
    calls = {"n": 0}

    def crashing_step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # dies in step 4, after the checkpoint of step 2 (ckpt_every=2)
            raise _Crash("killed")
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", crashing_step)
    with pytest.raises(_Crash):
        train_cca(tmp_path / "run", ref, data, args, progress=False, setup=RunSetup(ckpt_every=2))
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    state = torch.load(tmp_path / "run" / "train_state.pt", weights_only=True)
    assert state["step"] == 2
    with pytest.raises(ValueError, match="other settings"):
        train_cca(tmp_path / "run", ref, data, CCATrainArgs(**{**args.__dict__, "lam": 3.0}), progress=False,
                  setup=RunSetup(resume=True))
    resumed = train_cca(tmp_path / "run", ref, data, args, progress=False, setup=RunSetup(resume=True, ckpt_every=2))
    for (k, a), b in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert not (tmp_path / "run" / "train_state.pt").exists()  # finished: the model is the output
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [0, 4]  # every 10th step and the last, none twice after the resume


def test_snapshots_are_the_weights_at_their_step(tmp_path):
    """A snapshot at step k holds what a run stopped after k steps would return (constant lr, so the
    schedule does not depend on the run's length); the final weights are not duplicated as one."""
    ref, data = random_gpt(0), _tiny_codes()
    args = CCATrainArgs(lam=10.0, beta=0.1, lr=1e-3, lr_schedule="constant", batch_size=16, max_steps=5)
    train_cca(tmp_path / "run", ref, data, args, progress=False, setup=RunSetup(snapshot_every=2))
    assert sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir()) == ["step_00002", "step_00004"]
    short = train_cca(None, ref, data, CCATrainArgs(**{**args.__dict__, "max_steps": 2}), progress=False)
    snap = load_gpt(tmp_path / "run" / "snapshots" / "step_00002")
    for (k, a), b in zip(short.state_dict().items(), snap.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert json.loads((tmp_path / "run" / "snapshots" / "step_00002" / "config.json").read_text())["step"] == 2


def test_fid_command_on_adm_style_batches(tmp_path, capsys):
    torch.manual_seed(0)
    net = FIDInception().eval()
    for m in net.modules():  # He init: PyTorch's default shrinks the signal to a constant over 90 layers
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(m.weight)
    torch.save(net.state_dict(), tmp_path / "inception.pth")
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    reference = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "samples.npz", arr_0=samples)
    np.savez(tmp_path / "reference.npz", arr_0=reference)
    inception = ["--inception", str(tmp_path / "inception.pth"), "--quiet", "--pr-n", "10"]
    assert main(["fid", str(tmp_path / "samples.npz"), str(tmp_path / "samples.npz"), *inception]) == 0
    same = json.loads(capsys.readouterr().out)
    assert abs(same["fid"]) < 1e-3 and same["precision"] == 1.0 and same["recall"] == 1.0
    assert same["is"] >= 1.0
    assert main(["fid", str(tmp_path / "samples.npz"), str(tmp_path / "reference.npz"), *inception,
                 "--json", str(tmp_path / "m.json")]) == 0
    other = json.loads((tmp_path / "m.json").read_text())
    assert other["fid"] > 1e-3 and other["n_samples"] == 10 and other["n_reference"] == 12
    # a reference with precomputed statistics (ADM's VIRTUAL_imagenet256_labeled.npz has mu, sigma) is used as is
    feats = load_inception(tmp_path / "inception.pth")(torch.from_numpy(reference).permute(0, 3, 1, 2).float() / 255)[0]
    np.savez(tmp_path / "stats.npz", mu=feats.double().mean(0).numpy(), sigma=torch.cov(feats.double().T).numpy())
    capsys.readouterr()
    assert main(["fid", str(tmp_path / "samples.npz"), str(tmp_path / "stats.npz"), *inception]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["fid"] == pytest.approx(other["fid"], rel=1e-3) and stats["precision"] is None
    # errors name the problem; nothing is downloaded
    assert main(["fid", str(tmp_path / "samples.npz"), str(tmp_path / "reference.npz"), "--inception",
                 str(tmp_path / "missing.pth")]) == 2
    assert "never downloads" in capsys.readouterr().err
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not an FID Inception"):
        load_inception(tmp_path / "bad.pth")
