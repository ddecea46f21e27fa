"""What a search does, without Ray or HTTP: the model record, query preparation, embedding,
nearest-neighbour search in an `ImageIndex`, re-ranking (alpha-QE, diffusion on the shortlist,
class-agnostic spatial re-ranking by region proposals and spatial verification, both with a
localised box), thumbnails and pages of the collection.

The Ray Serve deployments (`raytrieval.serving.app`) and the in-process backend (`raytrieval.serving.ingress`) are thin
wrappers over these functions, so both answer the same way.
"""

from __future__ import annotations

import functools
import io
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from raytrieval.retrieval.artifacts import fingerprint, sha1_file
from raytrieval.retrieval.checkpoint import MODEL_FILE
from raytrieval.retrieval.imageio import DEFAULT_MAX_PIXELS, decode_image, load_image, resize_max
from raytrieval.retrieval.source import ModelSource, ModelSourceLike
from raytrieval.serving.index import ImageIndex

if TYPE_CHECKING:
    from raytrieval.retrieval.features import FeatureCache
    from raytrieval.serving.regions import RegionReranker

__all__ = [
    "PreparedImage",
    "SearchOptions",
    "embed_arrays",
    "list_images",
    "make_thumbnail",
    "model_record",
    "prepare_query",
    "search_images",
]

Box = tuple[float, float, float, float]


# ---------------------------------------------------------------------------------------------
# model


def model_record(model: Any, source: ModelSourceLike) -> dict[str, Any]:
    """What the index records about its model: source (tagged dict form), meta, dim and a fingerprint.

    The fingerprint covers the meta and, for checkpoints, the bytes of model.pt.
    """
    source = ModelSource.from_dict(source)
    weights = None
    if source.checkpoint is not None:
        weights = sha1_file(Path(source.checkpoint) / MODEL_FILE)
    meta = model.meta
    return {"source": source.to_dict(), "meta": meta, "dim": int(model.dim), "fingerprint": fingerprint(meta, weights)}


# ---------------------------------------------------------------------------------------------
# queries


@dataclass
class PreparedImage:
    """A decoded, cropped and resized image ready for the model.

    Args:
        pixels: (H, W, 3) uint8 RGB, longer side at most the model's max_size.
        width: width of the decoded image before cropping and resizing.
        height: its height.
        format: PIL's name of the encoded format ('JPEG', 'PNG', ...), or None.
    """

    pixels: np.ndarray
    width: int
    height: int
    format: str | None = None


def prepare_query(data: bytes, box: Sequence[float] | None, max_size: int,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> PreparedImage:
    """Decode uploaded bytes once, then crop to `box` and shrink to `max_size` with the extraction
    path (`raytrieval.retrieval.extract.fit_image`), so the pixels are exactly the model's input.

    Raises:
        raytrieval.retrieval.imageio.ImageDecodeError: the bytes are not a usable image.
        ValueError: the box is empty inside the image.
    """
    from raytrieval.retrieval.extract import fit_image

    img, fmt = decode_image(data, max_pixels=max_pixels)
    width, height = img.size
    pixels = np.asarray(fit_image(img, box, max_size), dtype=np.uint8)
    return PreparedImage(np.ascontiguousarray(pixels), width, height, fmt)


def embed_arrays(model: Any, images: Sequence[np.ndarray], scales: Sequence[float] = (1.0,),
                 max_size: int = 512) -> np.ndarray:
    """Descriptors of prepared (H, W, 3) uint8 images (batched by size on an accelerator): (n, D) float32."""
    from raytrieval.retrieval.extract import extract_descriptors

    if not images:
        return np.zeros((0, model.dim), np.float32)
    pil = [Image.fromarray(np.asarray(a, dtype=np.uint8)) for a in images]
    return extract_descriptors(model, pil, scales=scales, max_size=max_size, progress=False, io_threads=1)


# ---------------------------------------------------------------------------------------------
# search and re-ranking


@dataclass
class SearchOptions:
    """What a search returns and how it re-ranks.

    Args:
        k: results returned.
        aqe: alpha query expansion with the top `aqe_k` results, then search again.
        aqe_k: neighbours averaged into the query.
        aqe_alpha: power on their similarities.
        diffusion: re-rank a shortlist of `shortlist` results by diffusion on their kNN graph.
        shortlist: images re-ranked by diffusion.
        diffusion_k: neighbours per node of the shortlist's kNN graph.
        diffusion_kq: shortlist images the diffusion starts from.
        casr: re-rank the top `casr_top` results by their region proposal most similar to the
            query (CA-SR, `raytrieval.serving.regions`); each gets a localised box.
        casr_top: images re-ranked by CA-SR.
        spatial: verify the top `spatial_top` results with SIFT + a homography; verified images
            (at least `min_inliers` inliers) move up and get a localised box.
        spatial_top: images verified.
        min_inliers: inliers for an image to count as verified.
    """

    k: int = 10
    aqe: bool = False
    aqe_k: int = 3
    aqe_alpha: float = 3.0
    diffusion: bool = False
    shortlist: int = 100
    diffusion_k: int = 20
    diffusion_kq: int = 5
    casr: bool = False
    casr_top: int = 20
    spatial: bool = False
    spatial_top: int = 20
    min_inliers: int = 15

    def __post_init__(self) -> None:
        for name in ("k", "aqe_k", "shortlist", "diffusion_k", "diffusion_kq", "casr_top", "spatial_top",
                     "min_inliers"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
        if not 0 <= self.aqe_alpha <= 100:
            raise ValueError(f"aqe_alpha: must be in [0, 100], got {self.aqe_alpha}")

    def steps(self) -> list[str]:
        """The re-ranking steps these options apply, in order."""
        return [name for name in ("aqe", "diffusion", "casr", "spatial") if getattr(self, name)]


def _top(index: ImageIndex, q: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels) of one query, without the -1 padding of approximate kinds."""
    scores, labels = index.search(q, depth)
    ok = labels[0] >= 0
    return scores[0][ok], labels[0][ok]


def _spatial(records: dict[int, dict[str, Any]], labels: np.ndarray, query_image: np.ndarray, top: int, min_inliers: int,
             cache: FeatureCache) -> tuple[np.ndarray, dict[int, tuple[int, list[float] | None]]]:
    """Verify the first `top` labels; return the new order and {label: (inliers, box)}."""
    from raytrieval.retrieval.spatial import extract_local_features, localize, verify_pair

    qh, qw = query_image.shape[:2]
    qfeats = extract_local_features(query_image, max_features=cache.max_features)
    found: dict[int, tuple[int, list[float] | None]] = {}
    head = labels[:top]
    inliers = np.zeros(len(head), np.int64)
    for pos, label in enumerate(head):
        label = int(label)
        uri = records[label]["uri"]
        try:
            feats = cache.get(label, uri).stored if uri is not None else None  # stored-image pixels
        except ValueError:  # undecodable now: not verified, tried again next time
            feats = None
        if feats is None:
            found[label] = (0, None)
            continue
        height, width = feats.image_size
        ver = verify_pair(qfeats, feats)
        box = None
        if ver.inliers >= min_inliers and ver.model is not None:
            mapped = localize((0.0, 0.0, float(qw), float(qh)), ver.model, clip_to=(height, width))
            chosen = mapped if mapped is not None and mapped[2] > mapped[0] and mapped[3] > mapped[1] else ver.box_b
            box = None if chosen is None else [round(float(v), 1) for v in chosen]
        inliers[pos] = ver.inliers
        found[label] = (int(ver.inliers), box)
    verified = np.flatnonzero(inliers >= min_inliers)
    verified = verified[np.argsort(-inliers[verified], kind="stable")]
    rest = np.ones(len(labels), bool)
    rest[verified] = False
    return np.concatenate([labels[verified], labels[rest]]), found


def selected_options(directory: Path | None) -> dict[str, Any]:
    """The re-ranking the pipeline's select stage chose for this index (`selection.json` in the
    index directory, its 'serving' options), {} when there is none."""
    path = Path(directory) / "selection.json" if directory is not None else None
    if path is None or not path.is_file():
        return {}
    return _read_selection(str(path), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_selection(path: str, mtime_ns: int) -> dict[str, Any]:
    return dict(json.loads(Path(path).read_text()).get("serving", {}))


def resolve_options(index: ImageIndex, options: SearchOptions) -> SearchOptions:
    """The options a search runs with: when no re-ranking is asked, the one the pipeline
    selected for the index (`selected_options`)."""
    if options.aqe or options.diffusion:
        return options
    return replace(options, **selected_options(getattr(index, "directory", None)))


def search_images(
    index: ImageIndex,
    query: np.ndarray,
    options: SearchOptions,
    query_image: np.ndarray | None = None,
    cache: FeatureCache | None = None,
    regions: RegionReranker | None = None,
) -> list[dict[str, Any]]:
    """Search the index with one descriptor and re-rank as asked.

    Args:
        index: the image index.
        query: (D,) L2-normalised query descriptor.
        options: k and re-ranking (`resolve_options`: none asked is the index's selected one).
        query_image: (H, W, 3) uint8 query (cropped) for CA-SR and spatial verification.
        cache: SIFT features of database images (`raytrieval.retrieval.features.FeatureCache`,
            a fresh one with its serving defaults when None).
        regions: the index's `raytrieval.serving.regions.RegionReranker` (a fresh one when None).

    Returns:
        Up to k dicts {'image_id', 'score', 'width', 'height', 'inliers', 'box'} best first;
        'score' is the cosine similarity (after alpha-QE: of the expanded query; with
        diffusion: the diffusion score; with CA-SR: of the best proposal, for the re-ranked
        images); 'box' is set for images CA-SR re-ranked and for verified images (spatial
        verification's box wins), 'inliers' for verified images.
    """
    from raytrieval.retrieval.features import FeatureCache
    from raytrieval.retrieval.qe import alpha_qe

    options = resolve_options(index, options)
    q = np.ascontiguousarray(np.asarray(query, np.float32).reshape(1, -1))
    depth = max(options.k, options.shortlist if options.diffusion else 0, options.casr_top if options.casr else 0,
                options.aqe_k if options.aqe else 0, options.spatial_top if options.spatial else 0)
    with index.lock:  # the vector steps see one state of the index (milliseconds); SIFT runs outside
        scores, labels = _top(index, q, depth)
        if options.aqe and labels.size:
            kq = min(options.aqe_k, labels.size)
            neigh = index.vectors(labels[:kq])  # (kq, D)
            q = alpha_qe(q, neigh, np.arange(kq, dtype=np.int64)[None, :], kq, alpha=options.aqe_alpha)
            scores, labels = _top(index, q, depth)
        if options.diffusion and labels.size >= 3:
            from raytrieval.retrieval.diffusion import diffusion_scores

            X = index.vectors(labels)  # (S, D)
            n = X.shape[0]
            diff = diffusion_scores(q, X, k=min(options.diffusion_k, n - 1), kq=min(options.diffusion_kq, n), gamma=3.0,
                                    alpha=0.99, maxiter=20)[0]
            order = np.lexsort((-scores, -diff))  # diffusion first, similarity breaks ties
            labels, scores = labels[order], diff[order].astype(np.float32)
        records = {int(lab): index.record(int(lab)) for lab in labels}
    boxes: dict[int, list[float]] = {}
    if options.casr and query_image is not None and labels.size:
        from raytrieval.serving.regions import RegionReranker

        labels, scores, boxes = (regions or RegionReranker(index)).rerank(query_image, labels, scores, records,
                                                                          options.casr_top)
    found: dict[int, tuple[int, list[float] | None]] = {}
    if options.spatial and query_image is not None and labels.size:
        by_label = {int(lab): float(s) for lab, s in zip(labels, scores)}
        labels, found = _spatial(records, labels, query_image, options.spatial_top, options.min_inliers,
                                 cache or FeatureCache())
        scores = np.array([by_label[int(lab)] for lab in labels], np.float32)
    hits = []
    for score, label in zip(scores[: options.k], labels[: options.k]):
        rec = records[int(label)]
        inl, box = found.get(int(label), (None, None))
        box = box or boxes.get(int(label))
        hits.append({"image_id": rec["image_id"], "score": float(score), "width": rec["width"],
                     "height": rec["height"], "inliers": inl, "box": box})
    return hits


# ---------------------------------------------------------------------------------------------
# thumbnails


def make_thumbnail(uri: str, size: int = 256, quality: int = 85) -> bytes:
    """JPEG bytes of the image at `uri` with its longer side at most `size`."""
    img = resize_max(load_image(uri), size)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# the collection


def list_images(index: ImageIndex, offset: int, limit: int) -> dict[str, Any]:
    """One page of the indexed images, in the index's id order (`ImageIndex.image_ids`).

    Returns:
        {'total': images in the index, 'offset', 'limit', 'images': [{'image_id'}] of at most
        `limit` images from position `offset` (none past the end)}.

    Raises:
        ValueError: offset < 0 or limit < 1.
    """
    if offset < 0 or limit < 1:
        raise ValueError(f"list_images: offset must be >= 0 and limit >= 1, got {offset}, {limit}")
    ids = index.image_ids()
    return {"total": len(ids), "offset": offset, "limit": limit,
            "images": [{"image_id": image_id} for image_id in ids[offset:offset + limit]]}
