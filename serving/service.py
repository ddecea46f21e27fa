"""The synchronous index service: searches, adds, deletes, thumbnails and health of one
`ImageIndex`, with the SIFT cache of its spatial verification and the region sets of its CA-SR.

The Ray Serve `Searcher` deployment (`raytrieval.serving.app`) is this class, and the in-process
`LocalBackend` (`raytrieval.serving.ingress`) runs it in a thread, so both answer the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from raytrieval.serving.engine import SearchOptions, list_images, make_thumbnail, resolve_options, search_images
from raytrieval.serving.index import ImageIndex, IndexConfig, UnknownImageId, read_index_meta

__all__ = ["IndexService", "open_index"]


def open_index(index_dir: str | Path, config: dict[str, Any] | None = None, threads: int = 1) -> ImageIndex:
    """Open an index directory for serving.

    Args:
        index_dir: the index directory.
        config: `IndexConfig` fields overriding the recorded search/snapshot settings (unknown
            fields are ignored).
        threads: faiss OpenMP threads.
    """
    import faiss

    faiss.omp_set_num_threads(max(1, threads))
    cfg = None
    if config:
        recorded = read_index_meta(index_dir).get("config") or {}
        merged = {k: v for k, v in {**recorded, **config}.items() if k in IndexConfig.__dataclass_fields__}
        cfg = IndexConfig(**merged)
    return ImageIndex.open(index_dir, config=cfg)


class IndexService:
    """The single owner (writer) of an index, answering synchronously.

    Args:
        index: the open index.
        model: the model the index was embedded with, for CA-SR; None loads it from the index's
            record on the first CA-SR search.
    """

    def __init__(self, index: ImageIndex, model: Any = None) -> None:
        from raytrieval.retrieval.features import FeatureCache
        from raytrieval.serving.regions import RegionReranker

        self.index = index
        self.cache = FeatureCache()
        self.regions = RegionReranker(index, model)
        self._recognizer: Any = None

    def recognize(self, vector: np.ndarray, neighbours: int = 5) -> dict[str, Any]:
        """The pseudo-landmark of one query descriptor (`raytrieval.serving.recognition.Recognizer`).

        The index directory's calibration is loaded on first use and again when recognition.json
        changes; `NotCalibrated` when it has none.
        """
        from raytrieval.serving.recognition import RECOGNITION_FILE, NotCalibrated, Recognizer

        path = Path(self.index.directory) / RECOGNITION_FILE
        if not path.is_file():
            raise NotCalibrated(f"recognition: {self.index.directory} is not calibrated; run `raytrieval recognize "
                                f"--index {self.index.directory} --clusters <run dir>/clusters.parquet`")
        if self._recognizer is None or self._recognizer.mtime_ns != path.stat().st_mtime_ns:
            self._recognizer = Recognizer(self.index.directory)
        return self._recognizer.recognize(self.index, vector, neighbours)[0]

    def search(self, vector: np.ndarray, options: SearchOptions, query_image: np.ndarray | None) -> dict[str, Any]:
        """{'results': hits as `raytrieval.serving.engine.search_images` returns them, 'rerank':
        the steps applied (the index's selected re-ranking when the request asks for none)}."""
        options = resolve_options(self.index, options)
        return {"results": search_images(self.index, vector, options, query_image, self.cache, self.regions),
                "rerank": options.steps()}

    def add(self, items: list[dict[str, Any]]) -> int:
        """Add images durably; items hold image_id, vector, data, ext, width, height. Returns the count."""
        self.index.add([it["image_id"] for it in items], np.stack([it["vector"] for it in items]),
                       sizes=[(it["width"], it["height"]) for it in items],
                       data=[(it["data"], it["ext"]) for it in items])
        return len(self.index)

    def delete(self, image_id: str) -> int:
        """Delete an image durably (`UnknownImageId` when unknown). Returns the count."""
        self.index.delete(image_id)
        return len(self.index)

    def thumbnail(self, image_id: str, size: int) -> bytes:
        """JPEG bytes of a stored image (`UnknownImageId` when unknown or without a file)."""
        uri = self.index.record(self.index.label_of(image_id))["uri"]
        if uri is None:
            raise UnknownImageId(image_id)
        return make_thumbnail(uri, size)

    def list_images(self, offset: int, limit: int) -> dict[str, Any]:
        """One page of the collection (`raytrieval.serving.engine.list_images`)."""
        return list_images(self.index, offset, limit)

    def health(self) -> dict[str, Any]:
        """{'images', 'dim', 'kind', 'model' (the model fingerprint), 'index'}."""
        stats = self.index.stats()
        fp = (self.index.model or {}).get("fingerprint")
        return {"images": stats["images"], "dim": stats["dim"], "kind": stats["kind"], "model": fp,
                "index": self.index.info()}

    def snapshot(self) -> int:
        """Write a snapshot now; returns the mutation sequence number it covers."""
        self.index.snapshot()
        return self.index.seq
