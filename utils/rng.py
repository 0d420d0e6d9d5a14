"""Every random state of a process (torch, CUDA, numpy, Python), to save in a snapshot and restore on resume.

The states are tensors and plain Python types, so a snapshot holding them loads with ``weights_only=True``.
"""
import random
from typing import Optional

import numpy as np
import torch


def rng_state(device: torch.device) -> dict:
    """This process's RNG states: ``{"torch", "cuda" (None off CUDA), "numpy", "python"}``."""
    numpy_state = np.random.get_state()
    python_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": {"keys": torch.from_numpy(numpy_state[1].astype(np.int64)), "pos": int(numpy_state[2]),
                  "has_gauss": int(numpy_state[3]), "cached_gaussian": float(numpy_state[4])},
        "python": {"version": python_state[0], "state": list(python_state[1]), "gauss_next": python_state[2]},
    }


def set_rng_state(state: dict, device: torch.device, source: str = "the snapshot") -> None:
    """Restore what :func:`rng_state` returned (the CUDA state only on a CUDA ``device``); a state that is not of
    that form (a hand-edited snapshot) raises ``ValueError`` (one line)."""
    try:
        torch.set_rng_state(state["torch"])
        if device.type == "cuda" and state["cuda"] is not None:
            torch.cuda.set_rng_state(state["cuda"], device)
        numpy_state = state["numpy"]
        np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                             numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
        python_state = state["python"]
        random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss_next"]))
    except (AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError) as error:
        raise ValueError(f"{source}: its saved random states cannot be restored ({type(error).__name__}: "
                         f"{str(error).splitlines()[0] if str(error) else 'malformed'})") from None


def saved_rng_state(rng, rank: int, world_size: int, source: str) -> Optional[dict]:
    """Process ``rank``'s state in a snapshot's ``rng`` entry (``{"world_size", "ranks"}``, from
    :func:`gather_rng_states`), or None when the snapshot was written by another number of processes. An entry that
    is not of that form (a hand-edited snapshot) raises ``ValueError``, one line naming ``source``."""
    expected = f"{source}: its 'rng' entry is not the random states train.py saves ({{'world_size', 'ranks'}})"
    if not isinstance(rng, dict) or not isinstance(rng.get("world_size"), int) or not isinstance(rng.get("ranks"),
                                                                                              (list, tuple)):
        raise ValueError(expected)
    if rng["world_size"] != world_size:
        return None
    state = rng["ranks"][rank] if len(rng["ranks"]) == world_size else None
    keys = ("torch", "cuda", "numpy", "python")
    if not isinstance(state, dict) or not all(key in state for key in keys):
        raise ValueError(f"{expected}: process {rank}'s state is missing or incomplete")
    return state


def gather_rng_states(device: torch.device, world_size: int) -> list:
    """Every rank's :func:`rng_state`, indexed by rank (a collective: all ranks must call it)."""
    state = rng_state(device)
    if world_size == 1:
        return [state]
    states = [None] * world_size
    torch.distributed.all_gather_object(states, state)
    return states


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's global generator and Python's ``random``."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
