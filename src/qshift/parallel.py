"""How a method's batch is split over processes: one process (``LOCAL``) or ``torch.distributed`` ranks.

A :class:`~qshift.methods.base.Method` asks its communicator three things: which share of the batch
this process encodes (``shard``), the whole batch's embeddings with this process's share still attached
to the graph (``gather``), and the sum over processes of each gradient (``all_reduce``).  Every
batch-level term is then computed on the whole batch on every rank, each rank back-propagates through
its own share only, and the summed gradient is the one-process gradient exactly (up to the order of
floating-point sums).  Every rank must be given the same whole batch.

:class:`Distributed` is that communicator over an initialised ``torch.distributed`` process group
(gloo on CPU, nccl on GPU); :func:`from_environment` picks it under ``torchrun``;
:func:`encode_sharded` encodes a gallery with each rank encoding its share (docs/distributed.md).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from qshift.errors import UserError
from qshift.retrieval.encode import encode_batched

__all__ = ["Communicator", "Distributed", "LOCAL", "encode_sharded", "from_environment"]


class Communicator:
    """One process: the whole batch is this process's share; nothing to gather or reduce."""

    rank: int = 0
    world_size: int = 1

    def bounds(self, n: int) -> tuple[int, int]:
        """[start, stop) of this process's contiguous share of ``n`` rows."""
        return 0, n

    def shard(self, items: Any) -> Any:
        """This process's share of ``items`` (a sequence, array or tensor, sliced on its first axis)."""
        return items

    def gather(self, z: torch.Tensor) -> torch.Tensor:
        """The whole batch's rows from every process's ``z`` (this process's rows keep their gradient)."""
        return z

    def all_reduce(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor summed over processes."""
        return list(tensors)

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Rows from every process concatenated in rank order, without gradient (e.g. a gallery shard)."""
        return x

    def close(self) -> None:
        """Release what this communicator set up (nothing for one process)."""


LOCAL = Communicator()


class Distributed(Communicator):
    """The ranks of an initialised ``torch.distributed`` process group share each batch.

    Rank r encodes rows ``bounds(n)`` of the batch (contiguous, sizes differing by at most one, like
    ``torch.tensor_split``).  A rank whose share is empty (a batch smaller than the world) encodes the
    batch's first item and drops its row in :meth:`gather`, so a model never sees an empty batch and the
    rank still contributes a (zero) gradient to every all-reduce.
    """

    def __init__(self, group: Any = None, owns_group: bool = False) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("Distributed needs an initialised torch.distributed process group")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.owns_group = owns_group
        # nccl moves CUDA tensors only; gloo CPU ones
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if dist.get_backend(group) == "nccl" else torch.device("cpu"))
        self._drop_next = False  # set by shard() when this rank's share is empty

    def bounds(self, n: int) -> tuple[int, int]:
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def shard(self, items: Any) -> Any:
        n = len(items)
        if n == 0:
            raise UserError("cannot split an empty batch over processes")
        start, stop = self.bounds(n)
        self._drop_next = start == stop
        return items[:1] if self._drop_next else items[start:stop]

    def _all_gather(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``x`` (any row count, the same trailing shape and dtype), detached, in rank order."""
        x = x.detach().to(self.device)
        sizes = torch.tensor([x.shape[0]], dtype=torch.long, device=self.device)
        all_sizes = [torch.zeros_like(sizes) for _ in range(self.world_size)]
        dist.all_gather(all_sizes, sizes, group=self.group)
        counts = [int(s) for s in all_sizes]
        padded = x.new_zeros((max(counts), *x.shape[1:]))
        padded[: x.shape[0]] = x
        slots = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(slots, padded.contiguous(), group=self.group)
        return [s[:c] for s, c in zip(slots, counts)]

    def gather(self, z: torch.Tensor) -> torch.Tensor:
        if self._drop_next:
            z, self._drop_next = z[:0], False
        parts = [p.to(z.device) for p in self._all_gather(z)]
        parts[self.rank] = z  # the live tensor: this rank's rows carry the gradient
        return torch.cat(parts)

    def all_reduce(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        tensors = list(tensors)
        out: list[torch.Tensor | None] = [None] * len(tensors)
        for dtype in dict.fromkeys(t.dtype for t in tensors):  # one flat buffer per dtype (usually one)
            idx = [i for i, t in enumerate(tensors) if t.dtype == dtype]
            flat = torch.cat([tensors[i].detach().reshape(-1) for i in idx]).to(self.device)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
            offset = 0
            for i in idx:
                t = tensors[i]
                out[i] = flat[offset:offset + t.numel()].view(t.shape).to(t.device)
                offset += t.numel()
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([p.to(x.device) for p in self._all_gather(x)])

    def close(self) -> None:
        """Destroy the process group if :func:`from_environment` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def from_environment(device: str | torch.device = "cpu") -> Communicator:
    """``Distributed`` over the initialised process group when it has more than one rank; else, when
    torchrun's ``WORLD_SIZE`` / ``RANK`` say more than one process, initialise the group first (nccl for a
    CUDA ``device``, binding this process to ``LOCAL_RANK``'s GPU; gloo otherwise); else ``LOCAL``."""
    if dist.is_available() and dist.is_initialized():
        return Distributed() if dist.get_world_size() > 1 else LOCAL
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ or not dist.is_available():
        return LOCAL
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return Distributed(owns_group=True)


@torch.no_grad()
def encode_sharded(encode: Callable[[Any], torch.Tensor], items: Sequence, comm: Communicator = LOCAL,
                   batch_size: int = 256) -> torch.Tensor:
    """Encode ``items`` (e.g. a gallery) with each rank encoding its contiguous share in slices of
    ``batch_size``; every rank gets the whole [N, d] tensor, rows in the order of ``items``."""
    n = len(items)
    if n == 0:
        raise ValueError("nothing to encode")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    start, stop = comm.bounds(n)
    if start == stop:  # more ranks than items: encode one to learn the shape, contribute no rows
        local = encode(items[:1])[:0]
    else:
        local = encode_batched(encode, items[start:stop], batch_size)  # checks the share is finite
    return comm.gather_rows(local)
