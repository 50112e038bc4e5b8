"""Data-parallel training under torchrun: which process this is, and the few collectives the
training loop needs. PyTorch does the work (``torch.distributed``, ``DistributedDataParallel``);
this module only names it.

torchrun starts one process per rank with ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` in its
environment. Every rank builds the same model from the same seed, loads the same data and
draws the same global batch of each step; it then trains on its contiguous 1/world_size of
that batch (``cifarlab.data.Batch.shard``), and DDP averages the gradients, so N processes
take the steps one process would. Rank 0 alone writes the run directory.

A collective that fails because another rank died or stopped becomes a one-line
``DistributedError``; every collective has a timeout (``CIFARLAB_DIST_TIMEOUT`` seconds,
default 300), so a job never hangs for ever.

No torch import at module level: the loop imports this, and ``cifarlab train mlp-numpy``
never loads torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from cifarlab.errors import DistributedError, UsageError, reason


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: one process (the default) or a torchrun rank."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that writes files and shows progress."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Dist:
        """The torchrun variables, validated; one process when WORLD_SIZE is unset."""
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            world, rank, local = (int(env.get(k, "0")) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
        except ValueError:
            raise UsageError(
                "WORLD_SIZE, RANK and LOCAL_RANK must be integers (they are torchrun's)"
            ) from None
        if not (world >= 1 and 0 <= rank < world and local >= 0):
            raise UsageError(
                f"invalid torchrun environment: WORLD_SIZE={world} RANK={rank} LOCAL_RANK={local}"
            )
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if world > 1 and not env.get(k)]
        if missing:
            raise UsageError(
                f"WORLD_SIZE={world} but {' and '.join(missing)} unset: start the job with torchrun, or unset WORLD_SIZE"
            )
        return cls(rank, local, world)


def timeout() -> timedelta:
    try:
        seconds = float(os.environ.get("CIFARLAB_DIST_TIMEOUT", "300"))
    except ValueError:
        raise UsageError("CIFARLAB_DIST_TIMEOUT must be a number of seconds") from None
    if not 1.0 <= seconds <= 7 * 86400:  # nan, inf and 1e20 fail this too
        raise UsageError(f"CIFARLAB_DIST_TIMEOUT must be between 1 s and 7 days, got {seconds!r}")
    return timedelta(seconds=seconds)


_control: Any = None  # a gloo group for host-side flags, so a CUDA job never syncs its stream for them


def init(dist: Dist, device_type: str) -> str:
    """Join the job's process group (once); returns the backend: nccl for CUDA, else gloo."""
    global _control
    import torch.distributed as td

    backend = "nccl" if device_type == "cuda" else "gloo"
    if td.is_initialized():
        return td.get_backend()
    with collective("joining the job"):
        td.init_process_group(backend, timeout=timeout())
        _control = td.new_group(backend="gloo") if backend != "gloo" else td.group.WORLD
    return backend


def backend() -> str | None:
    import torch.distributed as td

    return td.get_backend() if td.is_available() and td.is_initialized() else None


@contextmanager
def collective(what: str) -> Iterator[None]:
    """Turn a failed collective (a rank died, stopped or timed out) into a one-line error."""
    try:
        yield
    except RuntimeError as e:  # torch.distributed.DistBackendError and gloo's errors are RuntimeErrors
        raise DistributedError(
            f"rank {os.environ.get('RANK', '?')}: lost the other processes of the job while {what} "
            f"({reason(e, 160)}); one of them stopped or died: see its output"
        ) from None


def any_rank(flag: bool, dist: Dist) -> bool:
    """True on every rank if ``flag`` is true on any (e.g. a stop request one rank received)."""
    if not dist.active:
        return flag
    import torch
    import torch.distributed as td

    t = torch.tensor([int(flag)], dtype=torch.int32)
    with collective("agreeing to stop"):
        td.all_reduce(t, op=td.ReduceOp.MAX, group=_control)
    return bool(t.item())


def all_reduce_sum(t: Any, dist: Dist, what: str) -> Any:
    """Sum ``t`` over ranks, in place; returns it."""
    if dist.active:
        import torch.distributed as td

        with collective(what):
            td.all_reduce(t)
    return t


def broadcast_text(text: str | None, dist: Dist, what: str) -> str | None:
    """Rank 0's ``text`` on every rank (None stays None): e.g. the run directory it created,
    or None when it failed. Sent as UTF-8 bytes, never pickled."""
    if not dist.active:
        return text
    import torch
    import torch.distributed as td

    data = b"\x00" if text is None else b"\x01" + text.encode()
    with collective(what):
        size = torch.tensor([len(data)], dtype=torch.int64)
        td.broadcast(size, 0, group=_control)
        buf = torch.zeros(int(size), dtype=torch.uint8)
        if dist.is_main:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        td.broadcast(buf, 0, group=_control)
    raw = bytes(buf.tolist())
    return None if raw[:1] == b"\x00" else raw[1:].decode()


def shutdown(clean: bool = True) -> None:
    """Leave the process group at the end of a job, on every rank. After a clean end the ranks
    first wait for one another: a rank that destroyed its group and exited while another was
    still on its way there could leave that one hanging in ``destroy_process_group`` (seen
    here once in a 2-rank gloo job; pytorch/pytorch#75097). After an error nothing collective
    is tried, since the rank that failed may never arrive: the process's exit frees the group."""
    global _control
    import gc

    import torch.distributed as td

    # a DDP model still alive holds the group: were it freed only after destroy_process_group,
    # the group's destructor (holding the GIL) could wait for a gloo thread that waits for the
    # GIL. Callers drop their learner first; this frees what only a reference cycle keeps.
    gc.collect()
    if clean and td.is_available() and td.is_initialized():
        td.barrier()
        td.destroy_process_group()
    _control = None
