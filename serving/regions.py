"""Class-agnostic spatial re-ranking (CA-SR, Salvador et al. 2016) of a search's top results,
with a localised box per result: `raytrieval.retrieval.region.casr_rerank` over the indexed
images' proposals.

The proposals of an indexed image are its learned ones where the index directory holds a
`regions.parquet` (`raytrieval regions`, keyed by image_id), else the label-free grid
proposals; they are pooled with RPA-sum (CA-SR's default, `raytrieval.evaluation.rerank`) by the
index's own model and kept in an LRU cache. Each re-ranked image is scored by its proposal most
similar to the query and localised by the query's similarity map (`similarity_box`).

Cost: one backbone pass for the query and one per re-ranked image not yet cached (about 0.3 s
each at 512 px on one CPU core, benchmarks/scale.md), so a first search with `casr_top` 20
takes seconds and later ones over the same images milliseconds.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from raytrieval.retrieval.imageio import ImageDecodeError
from raytrieval.retrieval.region import RegionSet, casr_rerank, proposal_descriptors
from raytrieval.retrieval.regions import REGIONS_FILE, read_regions, regions_by_image, write_regions

__all__ = ["RegionReranker", "RegionsUnavailable", "install_regions"]

POOL = "sum"  # RPA-sum, CA-SR's default pooling


def install_regions(src: str | Path, index_dir: str | Path) -> Path:
    """Validate a `regions.parquet` (`raytrieval.retrieval.regions.read_regions`) and write it
    into an index directory, where CA-SR searches take their learned proposals from."""
    return Path(write_regions(read_regions(src), Path(index_dir) / REGIONS_FILE))


class RegionsUnavailable(Exception):
    """Region re-ranking cannot run on this index (it records no model to pool regions with)."""


class RegionReranker:
    """CA-SR of one index's results, with the region sets of its images cached.

    Args:
        index: the `ImageIndex` (its directory may hold `regions.parquet`; its model record names
            the model when `model` is None).
        model: the `RetrievalNet` the index was embedded with; None loads it on first use.
        capacity: region sets kept (images).
    """

    def __init__(self, index: Any, model: Any = None, capacity: int = 256) -> None:
        if capacity < 1:
            raise ValueError(f"capacity: must be >= 1, got {capacity}")
        self.index = index
        self.capacity = capacity
        self.pooled = 0  # cache misses, for tests
        self._model = model
        self._learned: dict[str, np.ndarray] | None = None
        self._sets: OrderedDict[tuple[int, str], RegionSet] = OrderedDict()
        self._lock = threading.Lock()

    def model(self) -> Any:
        """The index's model (loaded once from its record)."""
        with self._lock:
            if self._model is None:
                from raytrieval.retrieval.source import load_model

                source = (self.index.model or {}).get("source")
                if source is None:
                    raise RegionsUnavailable(f"casr: the index at {self.index.directory} records no model")
                self._model = load_model(source)
            return self._model

    def learned(self) -> dict[str, np.ndarray]:
        """image_id -> (R, 4) learned proposals of the index directory's `regions.parquet` ({} without one)."""
        with self._lock:
            if self._learned is None:
                path = Path(self.index.directory) / REGIONS_FILE if self.index.directory is not None else None
                if path is not None and path.is_file():
                    self._learned = {k: boxes for k, (boxes, _) in regions_by_image(read_regions(path)).items()}
                else:
                    self._learned = {}
            return self._learned

    def region_set(self, label: int, record: dict[str, Any]) -> RegionSet | None:
        """Proposal descriptors of an indexed image (None without a decodable file)."""
        uri = record.get("uri")
        if uri is None:
            return None
        key = (int(label), str(uri))
        with self._lock:
            if key in self._sets:
                self._sets.move_to_end(key)
                return self._sets[key]
        model = self.model()
        try:
            found = proposal_descriptors(model, uri, self.learned().get(record["image_id"]), int(model.spec.max_size),
                                         pool=POOL)
        except (ImageDecodeError, OSError, ValueError):  # undecodable now: not re-ranked, tried again next time
            return None
        with self._lock:
            self.pooled += 1
            self._sets[key] = found
            while len(self._sets) > self.capacity:
                self._sets.popitem(last=False)
        return found

    def query_descriptor(self, query_image: np.ndarray) -> np.ndarray:
        """The (cropped, resized) query pooled like the proposals: the image as one whole-image proposal."""
        model = self.model()
        h, w = query_image.shape[:2]
        whole = np.array([[0, 0, w, h]], np.float32)
        img = Image.fromarray(np.asarray(query_image, np.uint8))
        return proposal_descriptors(model, img, whole, int(model.spec.max_size), pool=POOL).descriptors[0]

    def rerank(self, query_image: np.ndarray, labels: np.ndarray, scores: np.ndarray,
               records: dict[int, dict[str, Any]], top: int
               ) -> tuple[np.ndarray, np.ndarray, dict[int, list[float]]]:
        """CA-SR of the first `top` labels.

        Images of the head with a file move to the front in CA-SR order (score: their best
        proposal's similarity); those without one follow, then the rest, with their scores.

        Returns:
            (labels, scores, {label: localised box [x0, y0, x1, y1] in pixels of the stored image}).
        """
        head = [int(lab) for lab in labels[:top]]
        sets = {lab: self.region_set(lab, records[lab]) for lab in head}
        usable = np.array([lab for lab in head if sets[lab] is not None], np.int64)
        if usable.size == 0:
            return labels, scores, {}
        q = self.query_descriptor(query_image)
        order, region_scores, boxes = casr_rerank(q, [sets[int(lab)] for lab in usable], usable, len(usable))
        by_label = {int(lab): float(s) for lab, s in zip(labels, scores)}
        rest = [int(lab) for lab in labels if sets.get(int(lab)) is None]
        new_labels = np.concatenate([order, np.array(rest, np.int64)]).astype(labels.dtype)
        new_scores = np.concatenate([region_scores, [by_label[lab] for lab in rest]]).astype(np.float32)
        found = {int(lab): [round(float(v), 1) for v in box] for lab, box in zip(order, boxes)}
        return new_labels, new_scores, found
