"""Reading and writing qshift's own model checkpoints: one ``torch.save`` dict (``config``, ``state_dict``,
a JSON-safe ``card`` and any extra fields), written atomically and read back with ``weights_only=True``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from qshift.atomic import atomic_path
from qshift.errors import UserError


def half_state(state: dict[str, torch.Tensor], half: bool = True) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``state`` with floating tensors in fp16 (with ``half``)."""
    return {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).cpu().clone()
            for k, v in state.items()}


def save_checkpoint(path: str | Path, payload: dict[str, Any], card: dict | None = None) -> None:
    """Write ``payload`` plus ``card`` (through JSON, so the file loads with ``weights_only=True``) to ``path``
    atomically: a reader sees the old file or the whole new one."""
    full = dict(payload, card=json.loads(json.dumps(card or {}, default=str)))
    with atomic_path(path) as tmp:
        torch.save(full, tmp)


def read_checkpoint(path: str | Path, what: str, error: type[Exception] = UserError) -> Any:
    """``torch.load`` of ``path`` on the CPU with ``weights_only=True``; a damaged or foreign file raises
    ``error`` with one line naming ``what`` the file should have been."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # a truncated file, another format, a pickle with code in it
        first = str(e).splitlines()[0][:160] if str(e) else ""
        raise error(f"{path} is not a readable {what} ({type(e).__name__}: {first})") from e
