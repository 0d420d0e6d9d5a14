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

from utils.cli import RunFailure, parse_gpu_choice, parse_positive_float

DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0  # gloo (CPU): 5 minutes without an answer from a peer ends the run


class PeerLostError(RunFailure):
    """A collective operation failed: another process of the run died, stalled past the collective timeout, or
    closed its connection. The message names this process and the likely cause in one line."""


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


def add_collective_timeout_argument(parser: argparse.ArgumentParser) -> None:
    """``--collective-timeout``: how long a process waits for its peers in a collective operation (see
    :func:`init_distributed`); a script passes ``args.collective_timeout`` to :func:`process_group`."""
    parser.add_argument("--collective-timeout", type=parse_positive_float, default=DEFAULT_COLLECTIVE_TIMEOUT_S,
                        metavar="SECONDS",
                        help="under torchrun: end the run with one line when a peer process has not answered a "
                             "collective operation for this long (a stalled or dead process); on GPUs NCCL's "
                             "watchdog applies it (longer than the slowest step, e.g. the first one of "
                             "--compile 1)")


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
                     timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> DistInfo:
    """Join the process group that ``torchrun`` describes (if any) and pick this process's device.

    backend: "nccl" or "gloo"; default NCCL when CUDA is used, else gloo.
    use_cuda: default ``torch.cuda.is_available()``. Process ``local_rank`` uses GPU ``local_rank``.
    timeout_s: a collective operation that waits longer than this for a peer fails (gloo: in the waiting call;
    NCCL: its watchdog, with ``TORCH_NCCL_ASYNC_ERROR_HANDLING`` at its default, ends the process).
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
                                timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _is_collective_failure(error: BaseException) -> bool:
    """Whether ``error`` comes from the communication library (gloo's or NCCL's errors are RuntimeErrors whose
    text names them; newer ones are ``torch.distributed.DistError``)."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return type(error) is RuntimeError and any(  # our own errors subclass RuntimeError: never these
        marker in str(error) for marker in ("gloo/", "NCCL", "Connection reset by peer", "Connection closed by peer"))


@contextmanager
def process_group(use_cuda: bool | None = None,
                  timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S) -> Iterator[DistInfo]:
    """:func:`init_distributed` for a ``with`` block, which leaves the process group when it ends (also on an
    error): ``with process_group(use_cuda, args.collective_timeout) as info: ...``. A failed collective operation
    in the block (a peer that died or stalled) becomes a :class:`PeerLostError`: one line, no traceback."""
    info = init_distributed(use_cuda=use_cuda, timeout_s=timeout_s)
    lost = False
    try:
        yield info
    except RuntimeError as error:
        if info.world_size == 1 or not _is_collective_failure(error):
            raise
        lost = True
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PeerLostError(f"process {info.rank} of {info.world_size}: a peer process stopped answering (it died, "
                            f"or stalled past --collective-timeout {timeout_s:g} s); the run ends here "
                            f"({first_line.split('] ', 1)[-1].split('. ', 1)[0].rstrip('.')})") from None
    finally:
        if not lost:  # leaving a group whose peer is gone could wait for it again
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
