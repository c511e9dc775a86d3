"""Queries as they arrive in JSON — a base64 PNG / JPEG, a path under the allowed root, a text — to the
inputs the model's query tower takes, each checked on its own before it can join a batch.

A query that cannot be decoded raises :class:`QueryError` naming its field (``queries[3].image``), so one
bad query is answered 4xx and never reaches, or fails, an adaptation batch shared with other requests."""
from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from qshift.models.protocol import RetrievalModel

#: the image formats a query may use
IMAGE_FORMATS = ("PNG", "JPEG")


class QueryError(ValueError):
    """One query (or request field) that cannot be used; ``field`` names it, ``status`` is the HTTP code."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field, self.message, self.status = field, message, status


@dataclass(frozen=True)
class InputLimits:
    """What one query may be: image bytes and pixels, text length, and where paths may point."""

    max_image_bytes: int = 8 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_text_chars: int = 2000
    image_root: Path | None = None  # None: path queries are refused


@dataclass(frozen=True)
class RawQuery:
    """A query as the JSON schema gives it: exactly one of ``image`` (base64), ``path`` or ``text``."""

    image: str | None = None
    path: str | None = None
    text: str | None = None


class QueryCodec:
    """Decodes and checks queries for one model's query modality (``image`` or ``text``) and stacks
    decoded queries into the batch its ``encode_query`` takes.

    For the embedded world model an image's size is checked here (square, a whole multiple of its input
    size): a size the model cannot take is a 4xx for that request, not a failed batch shared with others."""

    def __init__(self, model: RetrievalModel, limits: InputLimits | None = None) -> None:
        self.modality = getattr(model, "query_modality", None)
        if self.modality not in ("image", "text"):
            raise ValueError(f"the service takes image or text queries; this model queries with "
                             f"{self.modality!r}")
        self.limits = limits or InputLimits()
        root = self.limits.image_root
        self.root = None if root is None else Path(root).resolve(strict=True)
        encoder = getattr(model, "encoder", None)
        self._world_images = getattr(encoder, "preprocess_images", None)
        self._world_size = getattr(getattr(encoder, "cfg", None), "image_size", None)
        self._tokenize = getattr(encoder, "tokenize", None)

    # ------------------------------------------------------------------ one query
    def decode(self, query: RawQuery, field: str) -> Any:
        """The model input of one query (``field``: its place in the request, for errors)."""
        given = [k for k in ("image", "path", "text") if getattr(query, k) is not None]
        if len(given) != 1:
            raise QueryError(field, f"give exactly one of image, path or text (got {', '.join(given) or 'none'})")
        kind = given[0]
        if self.modality == "text" and kind != "text":
            raise QueryError(field, "this server takes text queries (give text)")
        if self.modality == "image" and kind == "text":
            raise QueryError(field, "this server takes image queries (give image: base64 PNG/JPEG, or path)")
        if kind == "text":
            return self._text(query.text, f"{field}.text")
        if kind == "image":
            data = _b64(query.image, f"{field}.image", self.limits.max_image_bytes)
            return self._image(data, f"{field}.image")
        return self._image(self._read_path(query.path, f"{field}.path"), f"{field}.path")

    def _text(self, text: str, field: str) -> str:
        if not text.strip():
            raise QueryError(field, "empty text")
        if len(text) > self.limits.max_text_chars:
            raise QueryError(field, f"text of {len(text)} characters; at most {self.limits.max_text_chars}")
        if self._tokenize is not None:
            try:
                self._tokenize([text])
            except (ValueError, TypeError) as e:
                raise QueryError(field, f"the model cannot tokenise it: {e}") from e
        return text

    def _read_path(self, path: str, field: str) -> bytes:
        if self.root is None:
            raise QueryError(field, "path queries are off: start the server with --image-root DIR", 403)
        p = Path(path)
        p = p if p.is_absolute() else self.root / p
        try:
            resolved = p.resolve(strict=True)
        except (OSError, RuntimeError):
            raise QueryError(field, f"no such file under the image root: {path}", 404) from None
        if not resolved.is_relative_to(self.root):
            raise QueryError(field, f"{path} is outside the allowed image root", 403)
        if not resolved.is_file():
            raise QueryError(field, f"{path} is not a file", 404)
        size = resolved.stat().st_size
        if size > self.limits.max_image_bytes:
            raise QueryError(field, f"{size} bytes; at most {self.limits.max_image_bytes}", 413)
        return resolved.read_bytes()

    def _image(self, data: bytes, field: str) -> Any:
        try:
            with Image.open(io.BytesIO(data)) as im:
                if im.format not in IMAGE_FORMATS:
                    raise QueryError(field, f"a {im.format or 'unknown'} image; PNG or JPEG only")
                w, h = im.size
                if w * h > self.limits.max_image_pixels:
                    raise QueryError(field, f"{w}×{h} pixels; at most {self.limits.max_image_pixels}", 413)
                arr = np.array(im.convert("RGB"), dtype=np.uint8)
        except QueryError:
            raise
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise QueryError(field, f"not a decodable PNG / JPEG image ({type(e).__name__})") from None
        if self._world_images is None:
            return arr
        S = self._world_size
        if arr.shape[0] != arr.shape[1] or arr.shape[0] % S:
            raise QueryError(field, f"a {arr.shape[1]}×{arr.shape[0]} image; this model takes square images "
                                    f"of {S} px or a whole multiple of it")
        return arr

    # ------------------------------------------------------------------ a batch
    def collate(self, rows: list[Any]) -> Any:
        """Decoded queries (from any number of requests) as one batch for ``encode_query``."""
        if self.modality == "text":
            return list(rows)
        if all(r.shape == rows[0].shape for r in rows):
            return np.stack(rows)  # the uint8 batch a caller of Adapter.retrieve would pass
        if self._world_images is not None:  # sizes differ: each to the model's float input
            return torch.cat([self._world_images(r[None]) for r in rows])
        return list(rows)


def _b64(text: str, field: str, max_bytes: int) -> bytes:
    if text.startswith("data:"):
        head, sep, text = text.partition(",")
        if not sep or not head.endswith(";base64"):
            raise QueryError(field, "a data: URL must be data:image/png;base64,… or data:image/jpeg;base64,…")
    if len(text) > 4 * (max_bytes // 3 + 2):
        raise QueryError(field, f"more than {max_bytes} bytes once decoded", 413)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise QueryError(field, "not valid base64") from None
