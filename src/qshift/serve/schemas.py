"""The JSON schemas of the API (pydantic; FastAPI publishes them at ``/openapi.json`` and ``/docs``).

Types are strict (``"5"`` is not a number, ``5`` is not a text) and unknown fields are refused, so a
misspelt field is a 422 naming it rather than a silently ignored option."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from qshift.serve.inputs import RawQuery


class Query(BaseModel):
    """One query: exactly one of ``image``, ``path`` or ``text`` (by the server's direction)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    image: str | None = Field(None, description="A PNG or JPEG image, base64 (a data:image/…;base64, URL is also "
                                                "accepted).")
    path: str | None = Field(None, description="An image file under the server's --image-root (relative to it, or "
                                               "absolute inside it).")
    text: str | None = Field(None, description="A text query (t2i servers).")
    id: str | None = Field(None, max_length=200, description="Your id for this query, echoed in its result.")

    @model_validator(mode="after")
    def _one_input(self) -> "Query":
        given = [k for k in ("image", "path", "text") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of image, path or text (got {', '.join(given) or 'none'})")
        return self

    def raw(self) -> RawQuery:
        return RawQuery(image=self.image, path=self.path, text=self.text)


class RetrieveRequest(BaseModel):
    """A batch of queries to adapt on and rank the gallery for."""

    model_config = ConfigDict(extra="forbid", strict=True)

    queries: list[Query] = Field(min_length=1, description="At least one query; at most the server's "
                                                           "--max-request-queries.")
    k: int = Field(10, ge=1, description="Results per query; at most the server's --max-k.")


class QueryResult(BaseModel):
    id: str | None = Field(None, description="The query's id, as sent.")
    ids: list[str] = Field(description="The top-k gallery ids, best first.")
    scores: list[float] = Field(description="Their similarity scores (cosine, under the adapted model).")


class RetrieveResponse(BaseModel):
    results: list[QueryResult] = Field(description="One per query, in the request's order.")
    k: int
    batches: list[int] = Field(description="The adaptation batches (numbered from 1, over the state's life) that "
                                           "held this request's queries.")


class ErrorResponse(BaseModel):
    error: str = Field(description="What was wrong, in one line.")
    field: str | None = Field(None, description="The request field at fault (queries[2].image, k, body, …).")
    status: int


class ResetResponse(BaseModel):
    reset: bool
    batches: int
    state_digest: str


class CheckpointResponse(BaseModel):
    model_config = ConfigDict(extra="allow")

    state_file: str
    batches: int
    saved_at: str


def error_body(status: int, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": message, "field": field, "status": status}
