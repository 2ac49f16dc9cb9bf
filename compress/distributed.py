"""Multi-process fine-tuning on PyTorch's own engine: torchrun + DistributedDataParallel.

`torchrun --nproc_per_node=N -m compress apply ...` (or `compress apply --nproc N ...`, which
launches exactly that) runs the same pipeline in N processes: gloo on the CPU, nccl on CUDA. Every
process loads, plans and prepares the same model from the same data (so projections, proximal
steps and calibration statistics are identical on every rank); fine-tuning splits every global
batch across the processes and averages gradients; only rank 0 prints, exports, benchmarks and
writes files. The wrapped model never leaves the loop, so DDP's `module.` prefix never reaches
recipes, decisions or checkpoints.
"""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, number of processes); (0, 1) outside a distributed run."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return world()[0] == 0


def init_from_env(device: str) -> bool:
    """Join the process group torchrun describes in the environment, if there is one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo", timeout=timedelta(minutes=10))
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_true(flag: bool) -> bool:
    """Whether `flag` holds on every rank (so that all ranks stop together)."""
    if world()[1] == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item() > 0)


def launch(nproc: int, argv: list[str]) -> int:
    """Run `compress` again under torchrun with `nproc` processes on this machine; its exit code."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "compress", *argv]
    return subprocess.call(command)


def mean(values: list[float]) -> list[float]:
    """The average of each value over all ranks (for reporting per-process losses as one number)."""
    if world()[1] == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor)
    return (tensor / world()[1]).tolist()


def sum_tensors(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor summed over all ranks (float64 on the CPU, in place of the local values)."""
    if world()[1] == 1:
        return tensors
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = []
    for t in tensors:
        t = t.to(device=device, dtype=torch.float64).contiguous().clone()
        dist.all_reduce(t)
        out.append(t.cpu())
    return out
