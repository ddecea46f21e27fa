"""Pydantic models of the HTTP API (the only place pydantic is used, see DESIGN.md)."""

from __future__ import annotations

import math
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "AddJSON",
    "AddResponse",
    "AddedImage",
    "DeleteResponse",
    "ErrorResponse",
    "HealthResponse",
    "IMAGE_ID_PATTERN",
    "ImageList",
    "K_CEILING",
    "LIST_CEILING",
    "ListedImage",
    "NewImage",
    "QueryParams",
    "RecognizeJSON",
    "RecognizeParams",
    "RecognizeResponse",
    "SearchHit",
    "SearchJSON",
    "SearchParams",
    "SearchResponse",
    "multipart_schema",
]

K_CEILING = 1000  # the schema's bound on k; the server's own limit (ApiSettings.max_k) may be lower
LIST_CEILING = 200  # most images one page of `GET /images` lists
IMAGE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-/]{0,199}$"


def _parse_box(value: Any) -> Any:
    """Accept [x0, y0, x1, y1], or the form-field spellings 'x0,y0,x1,y1' and '[x0, y0, x1, y1]'."""
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        text = text.strip("[]() ")
        try:
            return [float(v) for v in text.split(",")]
        except ValueError:
            raise ValueError("box must be four numbers x0,y0,x1,y1") from None
    return value


class QueryParams(BaseModel):
    """Which part of the query image (the fields every query route shares)."""

    model_config = ConfigDict(extra="forbid")

    box: Optional[list[float]] = Field(
        None, min_length=4, max_length=4,
        description="crop of the query image, [x0, y0, x1, y1] in pixels of the uploaded image")

    @field_validator("box", mode="before")
    @classmethod
    def _box_text(cls, value: Any) -> Any:
        return _parse_box(value)

    @field_validator("box")
    @classmethod
    def _box_valid(cls, value: Optional[list[float]]) -> Optional[list[float]]:
        if value is None:
            return None
        if not all(math.isfinite(v) for v in value):
            raise ValueError("box must hold finite numbers")
        x0, y0, x1, y1 = value
        if not (x1 > x0 and y1 > y0):
            raise ValueError("box must have x1 > x0 and y1 > y0")
        if max(abs(v) for v in value) > 1e6:
            raise ValueError("box coordinates must be within 1e6 pixels")
        return value


class SearchParams(QueryParams):
    """How many results, which part of the query image, and which re-ranking."""

    k: int = Field(10, ge=1, le=K_CEILING, description="results to return (the server may allow fewer)")
    aqe: bool = Field(False, description="alpha query expansion")
    aqe_k: int = Field(3, ge=1, le=50, description="neighbours used by alpha-QE")
    aqe_alpha: float = Field(3.0, ge=0.0, le=10.0, description="alpha-QE power")
    diffusion: bool = Field(False, description="diffusion re-ranking of a shortlist")
    shortlist: int = Field(100, ge=3, le=1000, description="images re-ranked by diffusion")
    casr: bool = Field(False, description="class-agnostic spatial re-ranking by region proposals, with localised boxes")
    casr_top: int = Field(20, ge=1, le=100, description="images re-ranked by CA-SR")
    spatial: bool = Field(False, description="spatial verification (SIFT + homography) with localised boxes")
    spatial_top: int = Field(20, ge=1, le=100, description="images spatially verified")
    min_inliers: int = Field(15, ge=4, le=10000, description="inliers to count as verified")


class _ImageField(BaseModel):
    image: str = Field(..., min_length=1,
                       description="the query image, base64 (a data: URL prefix is accepted)")


class SearchJSON(SearchParams, _ImageField):
    """`POST /search` with `Content-Type: application/json`."""


class SearchHit(BaseModel):
    image_id: str
    score: float = Field(..., description="cosine similarity (diffusion: diffusion score)")
    rank: int = Field(..., ge=1)
    width: Optional[int] = Field(None, description="width of the database image in pixels")
    height: Optional[int] = None
    inliers: Optional[int] = Field(None, description="spatial verification inliers (when verified)")
    box: Optional[list[float]] = Field(
        None, description="localised box of the query in this image, [x0, y0, x1, y1] in its pixels")


class QueryInfo(BaseModel):
    width: int
    height: int
    box: Optional[list[float]] = None


class SearchResponse(BaseModel):
    results: list[SearchHit]
    k: int
    query: QueryInfo
    rerank: list[str] = Field(..., description="re-ranking steps applied, in order")
    timings_ms: dict[str, float]


class RecognizeParams(QueryParams):
    """`POST /recognize` form fields: the crop and how many voting neighbours to list."""

    neighbours: int = Field(5, ge=0, le=100, description="voting neighbours to list in the answer")


class RecognizeJSON(RecognizeParams, _ImageField):
    """`POST /recognize` with `Content-Type: application/json`."""


class Neighbour(BaseModel):
    image_id: str
    score: float = Field(..., description="cosine similarity")
    cluster: Optional[int] = Field(None, description="its pseudo-landmark (None: unclustered, votes for nothing)")


class RecognizeResponse(BaseModel):
    landmark: Optional[int] = Field(..., description="the pseudo-landmark (cluster id); None: unknown")
    known: bool
    candidate: Optional[int] = Field(None, description="the vote's winner, also when below the threshold")
    confidence: float = Field(..., description="the winner's vote confidence in [0, 1]")
    threshold: Optional[float] = Field(None, description="the calibrated threshold (None: always unknown)")
    neighbours: list[Neighbour]
    query: QueryInfo
    timings_ms: dict[str, float]


class NewImage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(..., min_length=1, description="the image, base64 (a data: URL prefix is accepted)")
    image_id: Optional[str] = Field(None, pattern=IMAGE_ID_PATTERN,
                                    description="id to give the image (default: img-<sha1 prefix>)")


class AddJSON(BaseModel):
    """`POST /images` with `Content-Type: application/json`."""

    model_config = ConfigDict(extra="forbid")

    images: list[NewImage] = Field(..., min_length=1, max_length=64)


class AddedImage(BaseModel):
    image_id: str
    width: int
    height: int


class AddResponse(BaseModel):
    added: list[AddedImage]
    count: int = Field(..., description="images in the index after the add")


class DeleteResponse(BaseModel):
    deleted: str
    count: int = Field(..., description="images in the index after the delete")


class ListedImage(BaseModel):
    image_id: str


class ImageList(BaseModel):
    """One page of `GET /images`: the indexed images in the index's id order."""

    total: int = Field(..., ge=0, description="images in the index")
    offset: int = Field(..., ge=0, description="position of the first listed image")
    limit: int = Field(..., ge=1, le=LIST_CEILING, description="most images a page lists")
    images: list[ListedImage]


class HealthResponse(BaseModel):
    status: str
    images: int
    dim: int
    kind: str
    model: Optional[str] = Field(None, description="fingerprint of the query model")
    index: Optional[dict] = Field(None, description="index info: factory, bytes per vector, build and rebuild seconds")


class ErrorResponse(BaseModel):
    error: str = Field(..., description="short machine-friendly reason")
    detail: Any = Field(None, description="more about it (text or validation errors)")


def multipart_schema(with_params: bool, params: type[QueryParams] | None = None) -> dict[str, Any]:
    """OpenAPI schema of the multipart bodies (a query route when with_params, its fields from
    `params`, default SearchParams; else `/images`)."""
    if with_params:
        props: dict[str, Any] = {"image": {"type": "string", "format": "binary", "description": "the query image"}}
        for name, prop in (params or SearchParams).model_json_schema()["properties"].items():
            if name == "box":
                props[name] = {"type": "string", "description": "x0,y0,x1,y1 in pixels", "example": "10,10,200,150"}
            else:
                props[name] = {k: v for k, v in prop.items() if k != "title"}
        return {"type": "object", "required": ["image"], "properties": props}
    return {
        "type": "object",
        "required": ["images"],
        "properties": {
            "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1},
            "image_id": {"type": "array", "items": {"type": "string", "pattern": IMAGE_ID_PATTERN},
                         "description": "ids for the files, in order (optional)"},
        },
    }
