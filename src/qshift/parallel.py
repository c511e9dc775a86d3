"""How a method's batch is split over processes: one process (``LOCAL``) or ``torch.distributed`` ranks.

A :class:`~qshift.methods.base.Method` asks its communicator three things: which share of the batch
this process encodes (``shard``), the whole batch's embeddings with this process's share still attached
to the graph (``gather``), and the sum over processes of each gradient (``all_reduce``).  Every
batch-level term is then computed on the whole batch on every rank, each rank back-propagates through
its own share only, and the summed gradient is the one-process gradient exactly.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["Communicator", "LOCAL"]


class Communicator:
    """One process: the whole batch is this process's share; nothing to gather or reduce."""

    rank: int = 0
    world_size: int = 1

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


LOCAL = Communicator()
