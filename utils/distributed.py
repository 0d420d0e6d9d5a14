"""Process-group helpers that work the same under ``torchrun`` and as a plain single process, and the ``--gpu``
choice of every script.

``torchrun`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them the process is rank 0 of 1 and no
process group is created, so every helper below degrades to a no-op.
"""
import argparse
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from utils.cli import parse_gpu_choice


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def add_gpu_argument(parser: argparse.ArgumentParser) -> None:
    """``--gpu``, the same flag in every script that computes (see :func:`apply_gpu_choice`)."""
    parser.add_argument("--gpu", type=parse_gpu_choice, default=None,
                        help="GPU ids this node may use, e.g. '0' or '0,1,2,3' (sets CUDA_VISIBLE_DEVICES; one GPU "
                             "per process: N ids need torchrun --nproc_per_node=N); 'cpu' for the CPU; default: the "
                             "visible GPUs, else the CPU")


def apply_gpu_choice(gpu: str | None) -> bool:
    """Honour ``--gpu`` (before CUDA is first used); returns whether this process computes on CUDA.

    Raises ValueError (one line, ``CUDA_VISIBLE_DEVICES`` left as it was) when ``gpu`` names more GPUs than this
    node has processes (each process uses one GPU, so a single ``python`` process would silently use the first
    only; the processes of this node: ``LOCAL_WORLD_SIZE`` (torchrun), else ``WORLD_SIZE``, else 1), or a GPU that
    this machine does not have (instead of running on the CPU).
    """
    if gpu == "cpu":
        return False
    if gpu is not None:
        ids = [value for value in gpu.split(",") if value.strip()]
        processes = _env_int("LOCAL_WORLD_SIZE", _env_int("WORLD_SIZE", 1))
        if len(ids) > processes:
            raise ValueError(f"--gpu {gpu} names {len(ids)} GPUs but there {'is' if processes == 1 else 'are'} "
                             f"{processes} process(es) (one GPU each): launch with torchrun "
                             f"--nproc_per_node={len(ids)}")
        previous = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
        found = torch.cuda.device_count()  # counts the devices CUDA_VISIBLE_DEVICES now names (before CUDA starts)
        if found < len(ids):
            if previous is None:
                del os.environ["CUDA_VISIBLE_DEVICES"]
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = previous
            present = "no CUDA GPU is usable here" if found == 0 else f"only {found} of them exist here"
            raise ValueError(f"--gpu {gpu}: {present}; name GPUs this machine has (nvidia-smi -L) or pass --gpu cpu "
                             "to run on the CPU")
    return torch.cuda.is_available()


def init_distributed(backend: str | None = None, use_cuda: bool | None = None,
                     timeout_minutes: float = 30.0) -> DistInfo:
    """Join the process group that ``torchrun`` describes (if any) and pick this process's device.

    backend: "nccl" or "gloo"; default NCCL when CUDA is used, else gloo.
    use_cuda: default ``torch.cuda.is_available()``. Process ``local_rank`` uses GPU ``local_rank``.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if use_cuda is None:
        use_cuda = torch.cuda.is_available()
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} GPU(s) are visible")
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if use_cuda else "gloo")
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=timedelta(minutes=timeout_minutes))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


@contextmanager
def process_group(use_cuda: bool | None = None) -> Iterator[DistInfo]:
    """:func:`init_distributed` for a ``with`` block, which leaves the process group when it ends (also on an
    error): ``with process_group(use_cuda) as info: ...``."""
    info = init_distributed(use_cuda=use_cuda)
    try:
        yield info
    finally:
        cleanup()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """True on rank 0 (and in a single process): the one process that logs and writes files."""
    return get_rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place; returns it (unchanged in a single process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shard(length: int, rank: int, world_size: int) -> range:
    """The contiguous share of ``range(length)`` that process ``rank`` of ``world_size`` takes: the shares cover
    every index exactly once (no padding, unlike ``DistributedSampler``)."""
    return range(rank * length // world_size, (rank + 1) * length // world_size)


def cleanup() -> None:
    """Leave the process group (safe to call when none exists)."""
    if is_distributed():
        dist.destroy_process_group()
