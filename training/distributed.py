"""torch.distributed plumbing for sampling and training under ``torchrun``.

Nothing here launches processes or implements a collective: ``torchrun`` starts the ranks and sets
RANK / WORLD_SIZE / LOCAL_RANK; this module joins its process group (NCCL on GPUs, gloo on CPU),
wraps models in DDP or FSDP2, and saves / loads full (unsharded) training states, so a run can
resume on a different number of ranks. A plain ``python`` process is world size 1 and takes the
same code path minus the process group.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("ddp", "fsdp")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str | None = None) -> DistEnv:
    """Join torchrun's process group if there is one. ``device``: "cpu" forces gloo on a GPU box;
    None picks CUDA when available (one GPU per rank, by LOCAL_RANK)."""
    use_cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
    if not launched_by_torchrun():
        return DistEnv(device=torch.device(device or ("cuda" if use_cuda else "cpu")))
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return DistEnv(rank, world, local, dev)


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def mean_metrics(env: DistEnv, metrics: dict[str, float]) -> dict[str, float]:
    """Average logged numbers over ranks (NaN on a rank, e.g. no true negatives, is left out)."""
    if not env.distributed or not metrics:
        return metrics
    keys = sorted(metrics)
    vals = torch.tensor([metrics[k] for k in keys], dtype=torch.float64, device=env.device)
    present = (~vals.isnan()).double()
    both = torch.cat([vals.nan_to_num(0.0) * present, present])
    dist.all_reduce(both)
    total, count = both.chunk(2)
    return {k: (t / c).item() if c > 0 else math.nan for k, t, c in zip(keys, total, count, strict=True)}


# ---- models --------------------------------------------------------------------------------
def wrap(model: nn.Module, env: DistEnv, strategy: str = "ddp") -> nn.Module:
    """DDP or FSDP2 (each transformer block sharded, then the root) when distributed, else as is."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    model = model.to(env.device)
    if not env.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[env.local_rank] if env.device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "layers", []):
        fully_shard(block)
    return fully_shard(model)


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if hasattr(model, "no_sync") and not enabled:  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(enabled)
        yield
    else:
        yield


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict on CPU (complete on rank 0; FSDP leaves it empty elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_train_state(path: Path, env: DistEnv, model: nn.Module, opt: torch.optim.Optimizer,
                     extra: dict[str, Any]) -> None:
    """Model, optimizer (full, unsharded) and ``extra`` in one ``torch.save`` file, written by
    rank 0 atomically (a kill mid-write leaves the previous checkpoint intact)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"model": model_sd, "optim": optim_sd, **extra}, tmp)
        os.replace(tmp, path)
    barrier(env)


def load_train_state(path: Path, model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Every rank reads the full state and keeps its shard; returns the file's other entries."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = torch.load(path, map_location="cpu", weights_only=True)
    set_state_dict(model, opt, model_state_dict=state.pop("model"), optim_state_dict=state.pop("optim"),
                   options=StateDictOptions(full_state_dict=True))
    return state
