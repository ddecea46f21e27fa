"""The HTTP API as a FastAPI app over a `Backend`, with safe defaults.

`create_app(backend, settings)` is used unchanged by the Ray Serve ingress deployment (backend =
deployment handles) and by tests and benchmarks in one process (`LocalBackend`).

Locked down by default:

- a `Host` allowlist (loopback names plus the configured public hosts) and one origin rule for
  every route: a foreign `Host`, a foreign `Origin` or a cross-site `Sec-Fetch-Site` is refused
  with 403 before any handler runs (DNS rebinding, cross-site forms and `<img>` probes);
- `POST`/`DELETE /images` always need the bearer token (`RAYTRIEVAL_TOKEN`, or the one
  `ensure_token` generates into the index directory); 401 comes before any body is validated.
  Searches, thumbnails and the collection's listing need it too when the server is public
  (`reads_need_token`);
- request bodies capped before they are parsed (413), only multipart and JSON bodies (415),
  images decode-checked with a pixel cap (415 not an image, 400 corrupt, 413 too many pixels),
  bounded k, re-ranking depths and listing pages (422), no server-side URL fetching, every
  error as JSON ``{"error": ..., "detail": ...}``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np
from fastapi import Depends, FastAPI, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from raytrieval.retrieval.imageio import ImageDecodeError
from raytrieval.serving.api import (
    IMAGE_ID_PATTERN,
    LIST_CEILING,
    AddJSON,
    AddResponse,
    DeleteResponse,
    ErrorResponse,
    HealthResponse,
    ImageList,
    QueryParams,
    RecognizeJSON,
    RecognizeParams,
    RecognizeResponse,
    SearchJSON,
    SearchParams,
    SearchResponse,
    multipart_schema,
)
from raytrieval.serving.engine import PreparedImage, SearchOptions, prepare_query
from raytrieval.serving.recognition import NotCalibrated
from raytrieval.serving.regions import RegionsUnavailable

__all__ = ["LOOPBACK_HOSTS", "TOKEN_FILE", "ApiError", "ApiSettings", "Backend", "BackendUnavailable", "LocalBackend",
           "create_app", "ensure_token", "is_loopback"]

log = logging.getLogger("raytrieval.serving")

STATIC = Path(__file__).resolve().parent / "static"
_FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp"}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
TOKEN_FILE = "api-token"
_PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
             "img-src 'self' blob: data:; connect-src 'self'; form-action 'none'; base-uri 'none'; "
             "frame-ancestors 'none'")


@dataclass
class ApiSettings:
    """Limits and access control of the HTTP API.

    Args:
        max_upload_bytes: largest request body (413 above).
        max_k: largest k a search may ask for (422 above).
        max_add_images: images one `POST /images` may carry.
        max_pixels: largest decoded width * height (decompression bombs: 413).
        token: the bearer token; None reads `token_env`. Without one (None and the variable
            unset, or empty) `POST`/`DELETE /images` answer 401 to everyone.
        token_env: environment variable holding the token.
        max_thumbnail: largest `size` of `GET /images/{id}`.
        public_hosts: host names, besides `LOOPBACK_HOSTS`, that the `Host` header may carry
            (the name clients use, e.g. behind a proxy or a Kubernetes Service). Any other Host
            is refused (403).
        reads_need_token: `POST /search`, `POST /recognize`, `GET /images` and
            `GET /images/{id}` need the token too (a public server); `/` and `/healthz` stay open
            either way.
    """

    max_upload_bytes: int = 10 * 1024 * 1024
    max_k: int = 100
    max_add_images: int = 16
    max_pixels: int = 40_000_000
    token: str | None = None
    token_env: str = "RAYTRIEVAL_TOKEN"
    max_thumbnail: int = 1024
    public_hosts: tuple[str, ...] = ()
    reads_need_token: bool = False

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_k", "max_add_images", "max_pixels", "max_thumbnail"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if isinstance(self.public_hosts, str):
            raise ValueError("public_hosts: a list of host names, not one string")
        names = tuple(str(h).strip().lower().strip("[]") for h in self.public_hosts)
        for host, name in zip(self.public_hosts, names):
            if not name or any(c in name for c in "/@ *") or name.count(":") == 1:
                raise ValueError(f"public_hosts: {host!r} is not a host name (no scheme, port or wildcard)")
        self.public_hosts = names

    def resolved_token(self) -> str | None:
        token = self.token if self.token is not None else os.environ.get(self.token_env, "")
        return token or None

    def allowed_hosts(self) -> frozenset[str]:
        return frozenset(LOOPBACK_HOSTS) | frozenset(self.public_hosts)


def is_loopback(host: str) -> bool:
    """Whether a listen address or host name is this machine only ('localhost', 127.0.0.0/8, ::1)."""
    name = host.strip().lower().strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def ensure_token(directory: str | os.PathLike, token_env: str = "RAYTRIEVAL_TOKEN") -> tuple[str, bool]:
    """The API token: `token_env` when set, else `directory/api-token`, created (mode 0600) if missing.

    A new token is printed once, with the file's path; later starts reuse the file silently.

    Args:
        directory: where the token file lives (the index or run directory).
        token_env: the environment variable of a configured token.

    Returns:
        (token, configured): configured is True when it came from `token_env`.

    Raises:
        ValueError: the token file is readable by group or others, empty, or cannot be created.
    """
    configured = os.environ.get(token_env, "")
    if configured:
        return configured, True
    path = Path(directory) / TOKEN_FILE
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        if not isinstance(exc, FileExistsError):
            raise ValueError(f"token file: cannot create {path} ({exc.strerror}); set {token_env}") from None
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise ValueError(f"token file: {path} has mode {mode:o}; it must be 600 (chmod 600 it, or delete it "
                             "and restart for a new token)") from None
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"token file: {path} is empty; delete it and restart for a new token")
        return token, False
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(token + "\n")
    print(f"raytrieval: API token for POST/DELETE /images (send 'Authorization: Bearer <token>'): {token}\n"
          f"raytrieval: stored in {path} (mode 600); set {token_env} to use your own", flush=True)
    return token, False


class ApiError(Exception):
    """An HTTP error answered as ``{"error": error, "detail": detail}``."""

    def __init__(self, status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None):
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers


class BackendUnavailable(Exception):
    """The embedder or searcher cannot answer right now (a replica restarting): 503."""


class Backend(Protocol):
    """What the HTTP layer needs from the model and the index."""

    async def info(self) -> dict[str, Any]:
        """{'max_size': int, 'scales': list, 'dim': int}."""

    async def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """(n, D) descriptors of prepared (H, W, 3) uint8 images."""

    async def search(self, vector: np.ndarray, options: SearchOptions,
                     query_image: np.ndarray | None) -> dict[str, Any]:
        """{'results', 'rerank'} as `raytrieval.serving.service.IndexService.search` returns them."""

    async def recognize(self, vector: np.ndarray, neighbours: int) -> dict[str, Any]:
        """One answer as `raytrieval.serving.recognition.Recognizer.recognize` gives it
        (`raytrieval.serving.recognition.NotCalibrated` without a calibration)."""

    async def add(self, items: list[dict[str, Any]]) -> int:
        """Add images durably; items hold image_id, vector, data, ext, width, height. Returns the count."""

    async def delete(self, image_id: str) -> int:
        """Delete an image durably (KeyError when unknown). Returns the count."""

    async def thumbnail(self, image_id: str, size: int) -> bytes:
        """JPEG bytes (KeyError when unknown)."""

    async def list_images(self, offset: int, limit: int) -> dict[str, Any]:
        """One page of the collection as `raytrieval.serving.engine.list_images` returns it."""

    async def health(self) -> dict[str, Any]:
        """{'images', 'dim', 'kind', 'model'}."""


class LocalBackend:
    """Model and index in this process (tests, benchmarks, the web page test): the model, and
    the `raytrieval.serving.service.IndexService` the Serve `Searcher` deployment is, run in threads.

    Args:
        model: a `RetrievalNet`.
        index: an `ImageIndex`.
    """

    def __init__(self, model: Any, index: Any) -> None:
        from raytrieval.serving.service import IndexService

        self.model = model
        self.service = IndexService(index, model)
        self._model_lock = threading.Lock()

    async def info(self) -> dict[str, Any]:
        spec = self.model.spec
        return {"max_size": int(spec.max_size), "scales": list(spec.scales), "dim": int(self.model.dim)}

    def embed_sync(self, images: Sequence[np.ndarray]) -> np.ndarray:
        from raytrieval.serving.engine import embed_arrays

        with self._model_lock:
            return embed_arrays(self.model, images, self.model.spec.scales, self.model.spec.max_size)

    async def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return await asyncio.to_thread(self.embed_sync, images)

    async def search(self, vector: np.ndarray, options: SearchOptions,
                     query_image: np.ndarray | None) -> dict[str, Any]:
        return await asyncio.to_thread(self.service.search, vector, options, query_image)

    async def recognize(self, vector: np.ndarray, neighbours: int) -> dict[str, Any]:
        return await asyncio.to_thread(self.service.recognize, vector, neighbours)

    async def add(self, items: list[dict[str, Any]]) -> int:
        return await asyncio.to_thread(self.service.add, items)

    async def delete(self, image_id: str) -> int:
        return await asyncio.to_thread(self.service.delete, image_id)

    async def thumbnail(self, image_id: str, size: int) -> bytes:
        return await asyncio.to_thread(self.service.thumbnail, image_id, size)

    async def list_images(self, offset: int, limit: int) -> dict[str, Any]:
        return await asyncio.to_thread(self.service.list_images, offset, limit)

    async def health(self) -> dict[str, Any]:
        return self.service.health()


# ---------------------------------------------------------------------------------------------
# ASGI middleware


class _BodyLimit:
    """Reject bodies above `max_bytes` with 413 before anything parses them (buffers at most that)."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _too_large(self, send: Any, size: str) -> None:
        body = json.dumps({"error": "payload too large",
                           "detail": f"request body {size} exceeds the limit of {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > self.max_bytes:
                    await self._too_large(send, f"of {int(declared)} bytes")
                    return
            except ValueError:
                pass
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._too_large(send, "")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> dict:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _host_name(host: str) -> str:
    """The name part of a Host header value ('[::1]:8000' -> '::1', 'a.example:80' -> 'a.example')."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0].rstrip(".") if host.count(":") == 1 else host.rstrip(".")


class _HostAndOrigin:
    """One origin rule for every route, checked before any handler (403 JSON).

    - `Host` must name this server (`allowed_hosts`): a page on attacker.example whose DNS name
      was rebound to 127.0.0.1 sends `Host: attacker.example` and is refused.
    - A browser's `Origin`, when sent, must equal `Host` (cross-origin fetches and form POSTs).
    - `Sec-Fetch-Site: cross-site | same-site` (what browsers send for another site's `<img>`,
      `<form>` or fetch, with or without `Origin`) is refused, except a top-level navigation to
      the web page `/`.

    Clients that send neither header (curl, scripts) are unaffected.
    """

    def __init__(self, app: Any, allowed_hosts: frozenset[str]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def _refuse(self, send: Any, detail: str) -> None:
        body = json.dumps({"error": "forbidden", "detail": detail}).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def _refusal(self, scope: dict) -> str | None:
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        if _host_name(host) not in self.allowed_hosts:
            return f"host {host!r} is not served here"
        origin = headers.get(b"origin")
        if origin is not None and origin.decode("latin-1").lower().split("://", 1)[-1].rstrip("/") != host:
            return "cross-origin requests are refused"
        site = headers.get(b"sec-fetch-site", b"").lower()
        if site in (b"cross-site", b"same-site"):
            navigation = scope["method"] in ("GET", "HEAD") and scope.get("path") == "/" \
                and headers.get(b"sec-fetch-mode", b"").lower() == b"navigate"
            if not navigation:
                return "cross-site requests are refused"
        return None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refusal = self._refusal(scope)
            if refusal is not None:
                await self._refuse(send, refusal)
                return
        await self.app(scope, receive, send)


class _SecurityHeaders:
    """nosniff, no referrer, no framing on every response."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                names = {k.lower() for k, _ in headers}
                for key, value in ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                                   (b"x-frame-options", b"DENY"), (b"cache-control", b"no-store")):
                    if key not in names:
                        headers.append((key, value))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, wrapped)


# ---------------------------------------------------------------------------------------------
# request parsing


def _error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "bad request (corrupt image, malformed body)", 401: "missing or wrong bearer token",
            403: "cross-origin browser request, or a Host not served",
            404: "unknown image", 409: "image id exists (adds), or no recognition calibration (recognize)",
            413: "body or image too large",
            415: "not an image, or an unsupported content type", 422: "invalid parameters",
            503: "backend restarting, retry"}
    return {c: {"model": ErrorResponse, "description": text[c]} for c in codes}


def _b64(text: str, field: str) -> bytes:
    if text[:8].lower().startswith(("http://", "https://", "file:", "ftp://")):
        raise ApiError(422, "urls not supported", f"{field}: send the image bytes (base64); the server never fetches URLs")
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid base64", f"{field} is not valid base64") from None


def _validation_detail(exc: ValidationError) -> list[dict[str, Any]]:
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]


async def _read_form(request: Request, max_files: int) -> Any:
    try:
        return await request.form(max_files=max_files, max_fields=64)
    except Exception as exc:  # noqa: BLE001 - any parser failure is the client's malformed body
        if "too many files" in str(exc).lower():
            raise ApiError(413, "too many images", f"at most {max_files} files per request") from None
        raise ApiError(400, "malformed multipart body", str(exc)[:200]) from None


async def _read_json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "malformed JSON", str(exc)[:200]) from None


def _content_kind(request: Request) -> str:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return "multipart"
    if ctype == "application/json":
        return "json"
    raise ApiError(415, "unsupported content type",
                   f"send multipart/form-data or application/json, got {ctype or 'none'!r}")


async def _upload_bytes(value: Any, field: str) -> bytes:
    if not isinstance(value, UploadFile):
        raise ApiError(422, "invalid request", f"{field} must be a file upload")
    ctype = (value.content_type or "").split(";")[0].strip().lower()
    if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
        raise ApiError(415, "unsupported media type", f"{field} has content type {ctype!r}; send an image")
    return await value.read()


def _decode_error(exc: ImageDecodeError) -> ApiError:
    if exc.reason == "not an image":
        return ApiError(415, "unsupported media type", "the upload is not an image format we can decode")
    if exc.reason.startswith("too many pixels"):
        return ApiError(413, "image too large", exc.reason)
    return ApiError(400, "bad image", exc.reason)


async def _prepare(data: bytes, box: Sequence[float] | None, max_size: int, max_pixels: int) -> PreparedImage:
    try:
        return await asyncio.to_thread(prepare_query, data, box, max_size, max_pixels)
    except ImageDecodeError as exc:
        raise _decode_error(exc) from None
    except ValueError as exc:  # an empty crop
        raise ApiError(422, "invalid box", str(exc)) from None


# ---------------------------------------------------------------------------------------------
# the app


def create_app(backend: Backend, settings: ApiSettings | None = None) -> FastAPI:
    """The FastAPI app of the image-search API.

    Args:
        backend: model + index access (`LocalBackend`, or Serve deployment handles).
        settings: limits, token and allowed hosts.

    Returns:
        The FastAPI app, with the body-limit, host/origin and security-header middleware.
    """
    settings = settings or ApiSettings()
    token = settings.resolved_token()
    app = FastAPI(
        title="raytrieval",
        version="0.1.0",
        description="Image search over a faiss index: upload an image, get the most similar images. "
                    "Errors are JSON {error, detail}. Adding and deleting images needs "
                    "`Authorization: Bearer <token>` (RAYTRIEVAL_TOKEN, or the api-token file the "
                    "server wrote into its index directory); on a public server reads (searches, "
                    "thumbnails, the listing) do too.",
        docs_url=None, redoc_url=None,  # the Swagger/Redoc pages load scripts from a CDN
    )
    app.add_middleware(_BodyLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(_HostAndOrigin, allowed_hosts=settings.allowed_hosts())  # outside the body limit
    app.add_middleware(_SecurityHeaders)
    bearer = HTTPBearer(auto_error=False, description="RAYTRIEVAL_TOKEN (or the server's api-token file)")
    info_cache: dict[str, Any] = {}

    async def mutation_auth(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        """The token check; FastAPI runs it before the handler reads or validates anything."""
        if token is None:
            raise ApiError(401, "unauthorized", "the server has no token configured, so it refuses changes",
                           headers={"WWW-Authenticate": "Bearer"})
        given = credentials.credentials if credentials is not None else ""
        if not secrets.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "unauthorized", "missing or wrong bearer token",
                           headers={"WWW-Authenticate": "Bearer"})

    async def read_auth(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if settings.reads_need_token:
            await mutation_auth(credentials)

    async def model_info() -> dict[str, Any]:
        if not info_cache:
            info = await _call(backend.info())
            index_dim = (await _call(backend.health()))["dim"]
            if int(info["dim"]) != int(index_dim):
                raise ApiError(503, "misconfigured", f"the model gives {info['dim']}-d descriptors, "
                                                     f"the index holds {index_dim}-d vectors")
            info_cache.update(info)
        return info_cache

    async def _call(coro: Any) -> Any:
        try:
            return await coro
        except BackendUnavailable as exc:
            raise ApiError(503, "backend unavailable", str(exc)[:200], headers={"Retry-After": "1"}) from None

    async def read_query(request: Request, form_model: type[QueryParams],
                         json_model: type[QueryParams]) -> tuple[Any, bytes]:
        """The fields and image bytes of a query route (multipart or JSON), validated (4xx JSON)."""
        if _content_kind(request) == "multipart":
            form = await _read_form(request, max_files=1)
            fields = {k: v for k, v in form.multi_items() if k != "image" and isinstance(v, str)}
            if "image" not in form:
                raise ApiError(422, "invalid request", "the form needs an 'image' file")
            data = await _upload_bytes(form["image"], "image")
            try:
                return form_model.model_validate(fields), data
            except ValidationError as exc:
                raise ApiError(422, "invalid request", _validation_detail(exc)) from None
        body = await _read_json(request)
        try:
            params = json_model.model_validate(body)
        except ValidationError as exc:
            raise ApiError(422, "invalid request", _validation_detail(exc)) from None
        return params, _b64(params.image, "image")

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
                  for e in exc.errors()]
        return JSONResponse({"error": "invalid request", "detail": jsonable_encoder(detail)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = {404: "not found", 405: "method not allowed"}.get(exc.status_code, "http error")
        return JSONResponse({"error": reason, "detail": exc.detail}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse({"error": "internal error", "detail": type(exc).__name__}, status_code=500)

    @app.get("/", include_in_schema=False)
    async def page() -> HTMLResponse:
        html = (STATIC / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Content-Security-Policy": _PAGE_CSP})

    @app.get("/healthz", response_model=HealthResponse, responses=_error_responses(403, 503),
             summary="Liveness and index size")
    async def healthz() -> dict[str, Any]:
        health = await _call(backend.health())
        return {"status": "ok", **health}

    search_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": multipart_schema(True)},
                "application/json": {"schema": SearchJSON.model_json_schema()},
            },
        }
    }

    async def embedded_query(request: Request, form: type, body: type) -> tuple[Any, Any, np.ndarray, list[float]]:
        """(params, prepared query, its descriptor, [t0 start, t1 read, t2 decoded, t3 embedded])."""
        t0 = time.perf_counter()
        params, data = await read_query(request, form, body)
        if getattr(params, "k", 0) > settings.max_k:
            raise ApiError(422, "k too large", f"k must be at most {settings.max_k}, got {params.k}")
        info = await model_info()
        t1 = time.perf_counter()
        prepared = await _prepare(data, params.box, int(info["max_size"]), settings.max_pixels)
        t2 = time.perf_counter()
        vector = (await _call(backend.embed([prepared.pixels])))[0]
        return params, prepared, vector, [t0, t1, t2, time.perf_counter()]

    def timings(times: list[float], last: str) -> dict[str, float]:
        """Milliseconds of each step of a query request (`last`: the step after embedding)."""
        names = ("read", "decode", "embed", last)
        steps = {n: round(1e3 * (b - a), 2) for n, a, b in zip(names, times, times[1:])}
        return steps | {"total": round(1e3 * (times[-1] - times[0]), 2)}

    @app.post("/search", response_model=SearchResponse, openapi_extra=search_body,
              responses=_error_responses(400, 401, 403, 409, 413, 415, 422, 503), dependencies=[Depends(read_auth)],
              summary="Find the images most similar to an uploaded image")
    async def search(request: Request) -> dict[str, Any]:
        params, prepared, vector, times = await embedded_query(request, SearchParams, SearchJSON)
        options = SearchOptions(k=params.k, aqe=params.aqe, aqe_k=params.aqe_k, aqe_alpha=params.aqe_alpha,
                                diffusion=params.diffusion, shortlist=params.shortlist, casr=params.casr,
                                casr_top=params.casr_top, spatial=params.spatial, spatial_top=params.spatial_top,
                                min_inliers=params.min_inliers)
        try:
            found = await _call(backend.search(vector, options,
                                               prepared.pixels if params.spatial or params.casr else None))
        except RegionsUnavailable as exc:
            raise ApiError(409, "no region re-ranking", str(exc)) from None
        times.append(time.perf_counter())
        return {
            "results": [{**h, "rank": i + 1} for i, h in enumerate(found["results"])],
            "k": params.k,
            "query": {"width": prepared.width, "height": prepared.height, "box": params.box},
            "rerank": found["rerank"],
            "timings_ms": timings(times, "search"),
        }

    recognize_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": multipart_schema(True, RecognizeParams)},
                "application/json": {"schema": RecognizeJSON.model_json_schema()},
            },
        }
    }

    @app.post("/recognize", response_model=RecognizeResponse, openapi_extra=recognize_body,
              responses=_error_responses(400, 401, 403, 409, 413, 415, 422, 503), dependencies=[Depends(read_auth)],
              summary="Recognise the pseudo-landmark of an uploaded image (or 'unknown')")
    async def recognize(request: Request) -> dict[str, Any]:
        params, prepared, vector, times = await embedded_query(request, RecognizeParams, RecognizeJSON)
        try:
            answer = await _call(backend.recognize(vector, params.neighbours))
        except NotCalibrated as exc:
            raise ApiError(409, "not calibrated", str(exc)) from None
        times.append(time.perf_counter())
        return {
            **answer, "known": answer["landmark"] is not None,
            "query": {"width": prepared.width, "height": prepared.height, "box": params.box},
            "timings_ms": timings(times, "recognize"),
        }

    add_body = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": multipart_schema(False)},
                "application/json": {"schema": AddJSON.model_json_schema(ref_template="#/components/schemas/{model}")},
            },
        }
    }

    @app.post("/images", response_model=AddResponse, status_code=201, openapi_extra=add_body,
              responses=_error_responses(400, 401, 403, 409, 413, 415, 422, 503), dependencies=[Depends(mutation_auth)],
              summary="Add images to the index (durable when answered)")
    async def add_images(request: Request) -> dict[str, Any]:
        kind = _content_kind(request)
        blobs: list[bytes] = []
        ids: list[str | None] = []
        if kind == "multipart":
            form = await _read_form(request, max_files=settings.max_add_images)
            files = form.getlist("images")
            if not files:
                raise ApiError(422, "invalid request", "the form needs one or more 'images' files")
            given = [v for v in form.getlist("image_id") if isinstance(v, str)]
            if given and len(given) != len(files):
                raise ApiError(422, "invalid request", f"{len(given)} image_id fields for {len(files)} images")
            for i, value in enumerate(files):
                blobs.append(await _upload_bytes(value, f"images[{i}]"))
            ids = list(given) if given else [None] * len(files)
        else:
            body = await _read_json(request)
            try:
                parsed = AddJSON.model_validate(body)
            except ValidationError as exc:
                raise ApiError(422, "invalid request", _validation_detail(exc)) from None
            for i, item in enumerate(parsed.images):
                blobs.append(_b64(item.image, f"images[{i}].image"))
                ids.append(item.image_id)
        if len(blobs) > settings.max_add_images:
            raise ApiError(413, "too many images", f"at most {settings.max_add_images} images per request")
        for image_id in ids:
            if image_id is not None and not re.fullmatch(IMAGE_ID_PATTERN, image_id):
                raise ApiError(422, "invalid image_id", f"{image_id!r} does not match {IMAGE_ID_PATTERN}")
        final_ids = [i if i is not None else f"img-{hashlib.sha1(b).hexdigest()[:16]}" for i, b in zip(ids, blobs)]
        if len(set(final_ids)) != len(final_ids):
            raise ApiError(409, "duplicate image id", "the request names an image id twice")
        info = await model_info()
        prepared = [await _prepare(b, None, int(info["max_size"]), settings.max_pixels) for b in blobs]
        vectors = await _call(backend.embed([p.pixels for p in prepared]))
        items = [{"image_id": image_id, "vector": np.asarray(vectors[i], np.float32), "data": blobs[i],
                  "ext": _FORMAT_EXT.get(prepared[i].format or "", "bin"), "width": prepared[i].width,
                  "height": prepared[i].height} for i, image_id in enumerate(final_ids)]
        try:
            count = await _call(backend.add(items))
        except ValueError as exc:  # DuplicateImageId
            raise ApiError(409, "image id exists", str(exc)) from None
        return {"added": [{"image_id": it["image_id"], "width": it["width"], "height": it["height"]} for it in items],
                "count": count}

    @app.delete("/images/{image_id:path}", response_model=DeleteResponse,
                responses=_error_responses(401, 403, 404, 503), dependencies=[Depends(mutation_auth)],
                summary="Delete an image from the index (durable when answered)")
    async def delete_image(image_id: str) -> dict[str, Any]:
        try:
            count = await _call(backend.delete(image_id))
        except KeyError:
            raise ApiError(404, "unknown image", f"no image {image_id!r}") from None
        return {"deleted": image_id, "count": count}

    @app.get("/images", response_model=ImageList, responses=_error_responses(401, 403, 422, 503),
             dependencies=[Depends(read_auth)], summary="Page through the indexed images (in the index's id order)")
    async def list_collection(
            offset: int = Query(0, ge=0, description="position of the first image to list"),
            limit: int = Query(48, ge=1, le=LIST_CEILING, description="most images to list")) -> dict[str, Any]:
        return await _call(backend.list_images(offset, limit))

    @app.get("/images/{image_id:path}", responses={200: {"content": {"image/jpeg": {}},
                                                          "description": "JPEG thumbnail"},
                                                    **_error_responses(401, 403, 404, 422, 503)},
             response_class=Response, dependencies=[Depends(read_auth)], summary="Thumbnail of an indexed image")
    async def get_image(image_id: str,
                        size: int = Query(256, ge=16, le=4096, description="longer side in pixels")) -> Response:
        if size > settings.max_thumbnail:
            raise ApiError(422, "size too large", f"size must be at most {settings.max_thumbnail}")
        try:
            data = await _call(backend.thumbnail(image_id, size))
        except KeyError:
            raise ApiError(404, "unknown image", f"no image {image_id!r}") from None
        except ImageDecodeError as exc:
            raise ApiError(404, "image unavailable", exc.reason) from None
        return Response(content=data, media_type="image/jpeg")

    return app
