"""The API's typed requests and responses (pydantic), as the OpenAPI page at ``/docs`` shows them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class SearchRequest(BaseModel):
    """One search. Give ``text``; or an image (``image``: base64 / data URI in JSON, a file part named
    ``image`` in multipart), or ``item`` / ``item_key`` (an indexed item: "more like this"); or both an
    image / item and a ``text`` (a composed query: reference + modification text); or a raw ``vector``;
    or only a ``filter``: browse the items that meet it, in ``order``."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, description="query text, or the modification text of a composed query")
    image: str | None = Field(None, description="query image as base64 or a data: URI (multipart: a file part)")
    item: int | None = Field(None, ge=0, le=2**63 - 1, description="id of an indexed item whose stored vector is the query (or reference)")
    item_key: str | None = Field(None, description="key of an indexed item, instead of its id")
    vector: list[float] | None = Field(None, description="a query embedding of the index's dimension")
    fusion: str | None = Field(None, description="composed queries: sum (default), weighted, intersection, text, image")
    weight: float | None = Field(None, ge=0.0, le=1.0, description="text weight of the weighted fusion (implies weighted)")
    fusion_options: dict[str, int | float | str] | None = Field(
        None, description="options of the fusion, e.g. {\"k1\": 200, \"mode\": \"product\"} for intersection")
    k: int = Field(10, ge=1, description="results per page (the server caps it)")
    offset: int = Field(0, ge=0, description="results to skip (paging; the server caps it)")
    rerank: list[str] | None = Field(
        None, description="reranker specs as on the command line, e.g. [\"emd:k=50\"] or [\"listwise:k=10,window=10\"]; "
                          "a request sets scoring options only: the model of a generative stage is the server's (--vlm)")
    pipeline: str | None = Field(
        None, description="a pipeline preset by name (configs/pipelines), e.g. \"emd\" or \"cotrr\" (describe -> "
                          "coarse -> listwise; needs a server started with --vlm)")
    keep_reference: bool = Field(False, description="keep the query's own item (item / item_key) in the results; by "
                                "default it is left out (more like this, composed reference)")
    exclude_dupes: bool = Field(False, description="one hit per near-duplicate group (similarity >= 0.95), the "
                                "best-ranked; the groups are found once per served version (`mmretrieve index dupes`)")
    filter: str | None = Field(
        None, description="a metadata filter, e.g. \"year >= 2020 and license in ('cc-by', 'cc0')\": only matching "
                          "items come back (k of them whenever k match); a filter that does not parse is a 400 naming "
                          "the token and its position; a filter alone, with no text, image, item or vector, browses "
                          "the matching items (score 0, ranked by `order`)")
    order: str | None = Field(
        None, description="browsing only (a filter and no query): \"id\" (default), \"added\" or a numeric metadata "
                          "field, each optionally followed by \" desc\", e.g. \"year desc\"")


class HitModel(BaseModel):
    id: int
    key: str
    kind: str
    caption: str | None = None
    score: float | None
    rank: int = Field(description="1-based rank over all pages")
    stage_ranks: dict[str, int] = Field(default_factory=dict, description="rank after each stage, e.g. {coarse: 7, emd: 1}")
    stage_scores: dict[str, float | None] = Field(default_factory=dict, description="each stage's own score")
    moment: float | None = Field(None, description="a video hit's best moment (seconds), from the frames reranker")
    extra: dict[str, Any] = Field(default_factory=dict)
    metadata: dict[str, Any] = Field(default_factory=dict, description="the item's stored metadata (manifest / parquet "
                                     "columns, shard, duration, size, width, height, added_at ...), typed as stored")
    thumbnail: str = Field(description="URL of a JPEG thumbnail")
    media: str | None = Field(None, description="URL of the original file (range requests supported)")


class SearchResponse(BaseModel):
    index: str
    version: str
    query: dict[str, Any]
    stages: list[str]
    k: int
    offset: int
    has_more: bool
    next_offset: int | None
    timings_ms: dict[str, float]
    hits: list[HitModel]
    description: str | None = Field(
        None, description="what the coarse stage searched for when a describe stage wrote it (model output: show it "
                          "as text, never as HTML); the same as stage_info.describe.description")
    stage_info: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="stage -> what it reports about this query. describe: {description, cost}; a generative "
                    "re-ranker (listwise, pairwise): {cost, reasoning, schedule / strategy, skipped}. A cost is "
                    "{prompts, cache_hits, prompt_tokens, generated_tokens, seconds, unparsed}: cache_hits of the "
                    "prompts were answered from the server's generation cache (no tokens generated for them)")


class Capabilities(BaseModel):
    fusions: list[str]
    rerankers: dict[str, str | None] = Field(description="reranker -> null when offered on this index, else why not")
    pipelines: dict[str, str | None] = Field(description="preset -> null when usable on this index, else why not")
    video: bool
    patches: bool
    max_k: int
    max_offset: int
    max_upload_bytes: int


class IndexSummary(BaseModel):
    name: str
    version: str
    items: int
    encoder: str
    dim: int
    videos: int
    patches: bool


class IndexDetail(IndexSummary):
    info: dict[str, Any] = Field(description="what `mmretrieve index info` shows (without server paths)")
    capabilities: Capabilities
    reloads: int
    loaded_at: float


class ItemModel(BaseModel):
    id: int
    key: str
    kind: str
    caption: str | None = None
    filename: str | None = None
    width: int | None = None
    height: int | None = None
    size: int | None = None
    added_at: float | None = None
    frames: int | None = None
    extra: dict[str, Any] = Field(default_factory=dict)
    thumbnail: str
    media: str | None = None


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | list[str] | None = Field(None, description="a text or a list of texts")
    image: str | None = Field(None, description="an image as base64 or a data: URI (multipart: a file part)")
    index: str | None = Field(None, description="whose encoder (default: the first served index)")


class EmbedResponse(BaseModel):
    encoder: str
    dim: int
    vectors: list[list[float]]


class Health(BaseModel):
    status: str
    indexes: dict[str, str] | None = None  # only with the token, where one is set


class ErrorDetail(BaseModel):
    type: str
    message: str
    status: int


class ErrorResponse(BaseModel):
    error: ErrorDetail


__all__ = ["SearchRequest", "SearchResponse", "HitModel", "Capabilities", "IndexSummary", "IndexDetail", "ItemModel",
           "EmbedRequest", "EmbedResponse", "Health", "ErrorResponse", "ErrorDetail"]
