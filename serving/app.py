"""Ray Serve application: Embedder (batched model) -> Searcher (faiss index) <- Ingress (FastAPI).

- `Embedder`: loads the query model once (a checkpoint directory, a ModelSpec, or the MLflow
  registry alias ``models:/<name>@champion`` when a tracking URI is given; mlflow is imported
  only then) and embeds prepared images with `@serve.batch`.
- `Searcher`: one replica owns the index directory (`raytrieval.serving.index.ImageIndex`): it reads the
  faiss file with `faiss.read_index` inside the replica (faiss indexes cannot be pickled),
  replays the mutation log, and answers searches, adds, deletes, thumbnails and pages of the
  collection. Adds and deletes are fsynced to the log before they are answered, so a replica
  that is killed and restarted by Serve comes back with every acknowledged mutation.
- `Ingress`: the FastAPI app of `raytrieval.serving.ingress.create_app` over deployment handles; a dead
  or restarting replica becomes a 503 with `Retry-After`.

`build_app(args)` is the typed application builder used by `serve deploy serving/serve_config.yaml`
and by `raytrieval serve`; `run_server` starts Serve on 127.0.0.1 by default. Both refuse a public
server (Serve's HTTP proxy on a non-loopback address, or `public_hosts` given) unless
`RAYTRIEVAL_TOKEN` is set; otherwise `build_app` uses the token file of the index directory
(`raytrieval.serving.ingress.ensure_token`), generated on the first start.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from pydantic import BaseModel, Field
from ray import serve
from ray.serve.handle import DeploymentHandle

from raytrieval.retrieval.source import ModelSource, ModelSourceLike
from raytrieval.serving.engine import SearchOptions
from raytrieval.serving.ingress import ApiSettings, BackendUnavailable, create_app, ensure_token, is_loopback
from raytrieval.serving.index import DuplicateImageId, UnknownImageId, read_index_meta
from raytrieval.serving.recognition import NotCalibrated
from raytrieval.serving.regions import RegionsUnavailable
from raytrieval.serving.service import IndexService, open_index

__all__ = ["AppArgs", "Embedder", "Ingress", "Searcher", "ServeBackend", "build_app", "check_exposure", "model_source",
           "run_server", "serve_http_host"]

log = logging.getLogger("ray.serve")

APP_NAME = "raytrieval"


def model_source(index_dir: str | os.PathLike, checkpoint: str | None = None, model_uri: str | None = None,
                 tracking_uri: str | None = None) -> ModelSource:
    """Where the query model comes from: an explicit checkpoint or registry URI, else the index's record.

    Args:
        index_dir: the index directory (its meta.json records the model that built it).
        checkpoint: a checkpoint directory to use instead.
        model_uri: an MLflow model URI such as ``models:/raytrieval@champion``.
        tracking_uri: the MLflow tracking URI for `model_uri`.

    Returns:
        The `ModelSource` of the query model.
    """
    if checkpoint:
        return ModelSource(checkpoint=str(Path(checkpoint).resolve()))
    if model_uri:
        return ModelSource(model_uri=model_uri, tracking_uri=tracking_uri)
    meta = read_index_meta(index_dir)
    source = (meta.get("model") or {}).get("source")
    if not source:
        raise ValueError(f"index: {index_dir} records no model; pass a checkpoint or a model_uri")
    return ModelSource.from_dict(source)


@serve.deployment(name="Embedder", ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32,
                  health_check_period_s=5, graceful_shutdown_timeout_s=5)
class Embedder:
    """The query model, batched.

    Args:
        source: the query model (`raytrieval.retrieval.source.ModelSource` or one of its dict forms).
        threads: torch intra-op threads.
        max_batch_size: images per forward pass.
        batch_wait_timeout_s: how long a batch waits to fill.
    """

    def __init__(self, source: ModelSourceLike, threads: int = 1, max_batch_size: int = 8,
                 batch_wait_timeout_s: float = 0.005) -> None:
        import ray
        import torch

        from raytrieval.serving.engine import model_record

        torch.set_num_threads(max(1, threads))
        source = ModelSource.from_dict(source)
        self.model = source.load()
        if ray.get_gpu_ids() and torch.cuda.is_available():  # only when the replica was given a GPU
            self.model = self.model.cuda()
        self.record = model_record(self.model, source) if source.model_uri is None else {"dim": self.model.dim}
        self.embed_one.set_max_batch_size(max_batch_size)
        self.embed_one.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def info(self) -> dict[str, Any]:
        spec = self.model.spec
        return {"max_size": int(spec.max_size), "scales": list(spec.scales), "dim": int(self.model.dim),
                "fingerprint": self.record.get("fingerprint")}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def embed_one(self, images: list[np.ndarray]) -> list[np.ndarray]:
        from raytrieval.serving.engine import embed_arrays

        spec = self.model.spec
        out = await asyncio.to_thread(embed_arrays, self.model, images, spec.scales, spec.max_size)
        return list(out)

    async def embed(self, images: list[np.ndarray]) -> np.ndarray:
        """(n, D): every image goes through the batch queue with other requests' images."""
        vectors = await asyncio.gather(*(self.embed_one(img) for img in images))
        return np.stack(vectors).astype(np.float32)


@serve.deployment(name="Searcher", num_replicas=1, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=64,
                  health_check_period_s=5, graceful_shutdown_timeout_s=5)
class Searcher(IndexService):
    """The single owner (writer) of an index directory: `IndexService` as a Serve deployment.

    Args:
        index_dir: the index directory.
        config: `IndexConfig` fields overriding the recorded search/snapshot settings.
        threads: faiss OpenMP threads.
    """

    def __init__(self, index_dir: str, config: dict[str, Any] | None = None, threads: int = 1) -> None:
        super().__init__(open_index(index_dir, config, threads))
        log.info("searcher: %d images (%s), replayed up to mutation %d", len(self.index), self.index.kind,
                 self.index.seq)

def _unavailable(exc: BaseException) -> bool:
    """Ray errors that mean 'the replica is gone or restarting', not 'your request is bad'."""
    import ray.exceptions as rex

    kinds = tuple(getattr(rex, name) for name in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                                                  "WorkerCrashedError", "ObjectLostError", "NodeDiedError")
                  if hasattr(rex, name))
    if isinstance(exc, kinds):
        return True
    serve_exc = __import__("ray.serve.exceptions", fromlist=["x"])
    more = tuple(getattr(serve_exc, name) for name in ("BackPressureError", "DeploymentUnavailableError",
                                                       "RequestCancelledError") if hasattr(serve_exc, name))
    return isinstance(exc, more) or isinstance(exc, (asyncio.TimeoutError, TimeoutError))


class ServeBackend:
    """`raytrieval.serving.ingress.Backend` over the Embedder and Searcher deployment handles."""

    def __init__(self, embedder: DeploymentHandle, searcher: DeploymentHandle, timeout_s: float = 30.0) -> None:
        self.embedder = embedder
        self.searcher = searcher
        self.timeout_s = timeout_s

    async def _call(self, handle: DeploymentHandle, method: str, *args: Any) -> Any:
        try:
            return await asyncio.wait_for(getattr(handle, method).remote(*args), self.timeout_s)
        except (DuplicateImageId, UnknownImageId, NotCalibrated, RegionsUnavailable):
            raise  # a Ray task error is also an instance of its cause's class
        except Exception as exc:  # noqa: BLE001 - 'unavailable' becomes a 503, anything else stays an error
            if _unavailable(exc):
                raise BackendUnavailable(f"{method}: {type(exc).__name__}") from None
            raise

    async def info(self) -> dict[str, Any]:
        return await self._call(self.embedder, "info")

    async def embed(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return await self._call(self.embedder, "embed", list(images))

    async def search(self, vector: np.ndarray, options: SearchOptions,
                     query_image: np.ndarray | None) -> dict[str, Any]:
        return await self._call(self.searcher, "search", np.asarray(vector, np.float32), options, query_image)

    async def recognize(self, vector: np.ndarray, neighbours: int) -> dict[str, Any]:
        return await self._call(self.searcher, "recognize", np.asarray(vector, np.float32), neighbours)

    async def add(self, items: list[dict[str, Any]]) -> int:
        return await self._call(self.searcher, "add", items)

    async def delete(self, image_id: str) -> int:
        return await self._call(self.searcher, "delete", image_id)

    async def thumbnail(self, image_id: str, size: int) -> bytes:
        return await self._call(self.searcher, "thumbnail", image_id, size)

    async def list_images(self, offset: int, limit: int) -> dict[str, Any]:
        return await self._call(self.searcher, "list_images", offset, limit)

    async def health(self) -> dict[str, Any]:
        return await self._call(self.searcher, "health")


@serve.deployment(name="Ingress", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress()
class Ingress:
    """FastAPI over the two handles (the app is built in the replica, after __init__)."""

    def __init__(self, embedder: DeploymentHandle, searcher: DeploymentHandle, settings: dict[str, Any]) -> None:
        self.backend = ServeBackend(embedder, searcher)
        self.settings = ApiSettings(**settings)

    def __serve_build_asgi_app__(self):
        return create_app(self.backend, self.settings)


class AppArgs(BaseModel):
    """Arguments of `build_app` (the `args:` of an application in a Serve config file)."""

    index: str = Field(..., description="index directory written by `raytrieval index build`")
    checkpoint: Optional[str] = Field(None, description="query model checkpoint (default: the index's model)")
    model_uri: Optional[str] = Field(None, description="MLflow model URI, e.g. models:/raytrieval@champion")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI for model_uri")
    embedder_replicas: int = Field(1, ge=1, description="embedder replicas (each holds the model)")
    embedder_cpus: float = Field(1.0, ge=0.0, description="CPUs reserved per embedder replica")
    embedder_gpus: float = Field(0.0, ge=0.0, description="GPUs per embedder replica (the model runs on it)")
    searcher_cpus: float = Field(1.0, ge=0.0, description="CPUs reserved by the searcher replica")
    embedder_threads: int = Field(1, ge=1, description="torch threads per embedder replica")
    max_batch_size: int = Field(8, ge=1, le=256, description="queries an embedder batches together")
    batch_wait_timeout_s: float = Field(0.005, ge=0.0, le=1.0, description="seconds a batch waits to fill")
    searcher_threads: int = Field(1, ge=1, description="faiss threads of the searcher")
    index_config: dict[str, Any] = Field(default_factory=dict, description="IndexConfig overrides (nprobe, ef_search, ...)")
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1024, description="largest accepted image upload")
    max_k: int = Field(100, ge=1, le=1000, description="most results a search may ask for")
    max_add_images: int = Field(16, ge=1, le=64, description="most images one POST /images may add")
    public_hosts: list[str] = Field(
        default_factory=list,
        description="host names clients use besides 127.0.0.1/localhost/::1 (the Host allowlist); "
                    "any listed makes the server public: RAYTRIEVAL_TOKEN is then required, on reads too")


def serve_http_host() -> str:
    """The address Serve's HTTP proxy listens on (Serve's default 127.0.0.1 when Serve is not started).

    `serve deploy` builds the application in a task of the cluster, where the controller holds
    the config's `http_options`; without Ray initialised (`serve run <import path>` builds first)
    Serve starts with its default.
    """
    import ray
    from ray.serve.context import _get_global_client  # no public accessor in Ray 2.60

    if not ray.is_initialized():
        return "127.0.0.1"
    client = _get_global_client(raise_if_no_controller_running=False)
    host = getattr(client.http_config, "host", None) if client is not None else None
    return host or "127.0.0.1"


def check_exposure(bind_host: str, public_hosts: Sequence[str], token_env: str = "RAYTRIEVAL_TOKEN") -> bool:
    """Whether the server is public; raises when it is and no token is configured.

    Args:
        bind_host: the listen address of the HTTP proxy.
        public_hosts: `AppArgs.public_hosts`.
        token_env: the variable of a configured token.

    Returns:
        True for a public server (non-loopback bind or a public host name).

    Raises:
        ValueError: public without `token_env`.
    """
    public = not is_loopback(bind_host) or bool(public_hosts)
    if public and not os.environ.get(token_env):
        where = f"listen on {bind_host}" if not is_loopback(bind_host) else f"answer for {list(public_hosts)}"
        raise ValueError(f"host: refusing to {where} without {token_env}; set a token first "
                         "(e.g. export RAYTRIEVAL_TOKEN=$(openssl rand -hex 32))")
    return public


def build_app(args: AppArgs | dict[str, Any]) -> Any:
    """The Serve application (typed builder for `serve deploy` / `serve run`).

    Args:
        args: `AppArgs` or a dict of its fields.

    Returns:
        The bound application (Ingress over Embedder and Searcher).

    Raises:
        ValueError: a missing index, or a public server (see `check_exposure`) without a token.
    """
    if isinstance(args, dict):
        args = AppArgs(**args)
    public = check_exposure(serve_http_host(), args.public_hosts)
    index_dir = str(Path(args.index).resolve())
    if not (Path(index_dir) / "meta.json").is_file():
        raise ValueError(f"index: no meta.json in {index_dir}; run `raytrieval index build` first")
    token, _ = ensure_token(index_dir)
    source = model_source(index_dir, args.checkpoint, args.model_uri, args.tracking_uri)
    embedder = Embedder.options(num_replicas=args.embedder_replicas,
                                ray_actor_options={"num_cpus": args.embedder_cpus,
                                                   "num_gpus": args.embedder_gpus}).bind(
        source, args.embedder_threads, args.max_batch_size, args.batch_wait_timeout_s)
    searcher = Searcher.options(ray_actor_options={"num_cpus": args.searcher_cpus}).bind(index_dir, args.index_config or None, args.searcher_threads)
    settings = {"max_upload_bytes": args.max_upload_bytes, "max_k": args.max_k, "max_add_images": args.max_add_images,
                "token": token, "public_hosts": tuple(args.public_hosts), "reads_need_token": public}
    return Ingress.bind(embedder, searcher, settings)


def run_server(args: AppArgs | dict[str, Any], host: str = "127.0.0.1", port: int = 8000,
               name: str = APP_NAME, blocking: bool = False) -> DeploymentHandle:
    """Start Serve's HTTP proxy on host:port and deploy the app (Ray must be initialised).

    Refuses a non-loopback host unless a bearer token is set (RAYTRIEVAL_TOKEN), before listening.
    """
    if isinstance(args, dict):
        args = AppArgs(**args)
    check_exposure(host, args.public_hosts)
    serve.start(http_options={"host": host, "port": port})
    return serve.run(build_app(args), name=name, route_prefix="/", blocking=blocking)
