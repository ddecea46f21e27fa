"""Landmark recognition over a serving index: calibration artifact and the kNN vote of its neighbours.

`calibrate_index` runs the label-free calibration of `raytrieval.retrieval.recognition` on an
`ImageIndex` (every indexed image a leave-one-out pseudo-query) and `write_recognition` stores
it in the index directory:

- `<index>/clusters.parquet`: the clean stage's clusters (pseudo-landmarks) the votes use;
- `<index>/recognition.json`: the threshold, the target, the pseudo-precision/coverage curve,
  the vote settings, which pseudo-queries were used and the SHA-1 of the clusters file.

The pseudo-queries are the indexed vectors themselves, or (given the query model) each
clustered image cropped to its cluster box (the extent of its verified inliers), re-embedded:
closer to queries that show only the landmark, which match their cluster less strongly than a
whole database image does (unclustered images stay whole).

`Recognizer` loads both and answers queries; images added to the index later are unclustered
and vote for nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from raytrieval.retrieval.artifacts import atomic_write_json, sha1_file
from raytrieval.retrieval.clusters import box_map, cluster_map, read_clusters, write_clusters
from raytrieval.retrieval.recognition import Calibration, RecognitionConfig, calibrate, drop_self, vote
from raytrieval.serving.index import ImageIndex

__all__ = ["CLUSTERS_FILE", "RECOGNITION_FILE", "NotCalibrated", "Recognizer", "calibrate_index", "crop_queries",
           "write_recognition"]

RECOGNITION_FILE = "recognition.json"
CLUSTERS_FILE = "clusters.parquet"
_CHUNK = 4096


class NotCalibrated(FileNotFoundError):
    """The index directory has no recognition calibration (run `raytrieval recognize --clusters`)."""


def _neighbour_clusters(index: ImageIndex, nbrs: np.ndarray, clusters: dict[str, int]) -> np.ndarray:
    """(Q, k) cluster id of each neighbour label (-1: unclustered or padding)."""
    by_label: dict[int, int] = {}
    out = np.full(nbrs.shape, -1, np.int64)
    for pos, label in np.ndenumerate(nbrs):
        label = int(label)
        if label < 0:
            continue
        if label not in by_label:
            by_label[label] = clusters.get(index.record(label)["image_id"], -1)
        out[pos] = by_label[label]
    return out


def crop_queries(index: ImageIndex, boxes: dict[str, tuple[float, float, float, float]], model: Any
                 ) -> dict[str, np.ndarray]:
    """image_id -> descriptor of the indexed image cropped to its box (images with a file and a box).

    Args:
        index: the index (its records give the image files).
        boxes: image_id -> (x0, y0, x1, y1) in pixels of the stored image (`clusters.parquet`).
        model: the query model (a `RetrievalNet`).
    """
    from raytrieval.retrieval.extract import extract_descriptors

    with index.lock:
        todo = [(i, index.record(index.label_of(i))["uri"]) for i in index.image_ids() if i in boxes]
    todo = [(i, uri) for i, uri in todo if uri is not None]
    if not todo:
        return {}
    vectors = extract_descriptors(model, [uri for _, uri in todo], boxes=[boxes[i] for i, _ in todo],
                                  scales=model.spec.scales, max_size=model.spec.max_size, progress=False)
    return {i: vectors[n] for n, (i, _) in enumerate(todo)}


def calibrate_index(index: ImageIndex, clusters: dict[str, int], cfg: RecognitionConfig,
                    queries: dict[str, np.ndarray] | None = None) -> Calibration:
    """Leave-one-out vote of every indexed image, then the calibrated threshold.

    Args:
        index: the index; its stored vectors are the pseudo-queries.
        clusters: image_id -> cluster id (images not listed are pseudo-negatives).
        cfg: vote and calibration settings.
        queries: image_id -> a descriptor to use as that image's pseudo-query instead of its
            stored vector (e.g. `crop_queries`); its own image is still left out.

    Returns:
        The Calibration (counts include how many cluster images the index holds).
    """
    with index.lock:
        ids = index.image_ids()
        labels = np.array([index.label_of(i) for i in ids], np.int64)
        if len(ids) <= cfg.k:
            raise ValueError(f"k: the index holds {len(ids)} images; leave-one-out with k={cfg.k} needs more")
        truth = np.array([clusters.get(i, -1) for i in ids], np.int64)
        if not (truth >= 0).any():
            raise ValueError("clusters: none of the indexed images is in a cluster")
        preds, confs = [], []
        for s in range(0, len(ids), _CHUNK):
            part = labels[s:s + _CHUNK]
            vectors = index.vectors(part)
            for row, image_id in enumerate(ids[s:s + _CHUNK]):
                if queries and image_id in queries:
                    vectors[row] = queries[image_id]
            scores, nbrs = index.search(vectors, cfg.k + 1)
            nbrs, scores = drop_self(nbrs, scores, cfg.k, self_ids=part)
            p, c = vote(scores, _neighbour_clusters(index, nbrs, clusters), cfg.power, cfg.confidence)
            preds.append(p)
            confs.append(c)
    cal = calibrate(np.concatenate(preds), np.concatenate(confs), truth, cfg)
    cal.counts["clusters"] = int(np.unique(truth[truth >= 0]).size)
    return cal


def write_recognition(index_dir: str | os.PathLike, clusters_path: str | os.PathLike,
                      cfg: RecognitionConfig | None = None, crops_model: Any = None) -> Calibration:
    """Calibrate an index directory on a clusters file and store both there (see the module docstring).

    Args:
        index_dir: the index directory.
        clusters_path: the clean stage's clusters.parquet.
        cfg: vote and calibration settings.
        crops_model: the query model: pseudo-queries are then the clustered images cropped to
            their boxes (`crop_queries`); None uses the stored vectors.
    """
    cfg = cfg or RecognitionConfig()
    index_dir = Path(index_dir)
    if not Path(clusters_path).is_file():
        raise FileNotFoundError(f"clusters: {clusters_path} does not exist (run `raytrieval clean` first)")
    clusters = cluster_map(clusters_path)
    index = ImageIndex.open(index_dir)
    try:
        queries = crop_queries(index, box_map(clusters_path), crops_model) if crops_model is not None else None
        cal = calibrate_index(index, clusters, cfg, queries)
    finally:
        index.close()
    if Path(clusters_path).resolve() != (index_dir / CLUSTERS_FILE).resolve():
        write_clusters(read_clusters(clusters_path), index_dir / CLUSTERS_FILE)
    record = {**cal.to_dict(), "pseudo_queries": "stored" if queries is None else f"{len(queries)} box crops",
              "clusters_sha1": sha1_file(index_dir / CLUSTERS_FILE),
              "clusters_source": str(Path(clusters_path).resolve())}
    atomic_write_json(index_dir / RECOGNITION_FILE, record)
    return cal


class Recognizer:
    """The calibration and clusters of an index directory, answering queries.

    Args:
        index_dir: the index directory holding recognition.json and clusters.parquet.

    Raises:
        NotCalibrated: either file is missing.
        ValueError: the clusters file changed since the calibration.
    """

    def __init__(self, index_dir: str | os.PathLike) -> None:
        import json

        index_dir = Path(index_dir)
        path, cpath = index_dir / RECOGNITION_FILE, index_dir / CLUSTERS_FILE
        if not (path.is_file() and cpath.is_file()):
            raise NotCalibrated(f"recognition: {index_dir} is not calibrated; run "
                                f"`raytrieval recognize --index {index_dir} --clusters <run dir>/clusters.parquet`")
        record = json.loads(path.read_text())
        if record.get("clusters_sha1") not in (None, sha1_file(cpath)):
            raise ValueError(f"recognition: {cpath} changed since the calibration; calibrate again")
        self.calibration = Calibration.from_dict(record)
        self.config = RecognitionConfig(**{k: v for k, v in self.calibration.config.items()
                                           if k in RecognitionConfig.__dataclass_fields__})
        self.clusters = cluster_map(cpath)
        self.mtime_ns = path.stat().st_mtime_ns

    def recognize(self, index: ImageIndex, vectors: np.ndarray, neighbours: int = 0) -> list[dict[str, Any]]:
        """Recognise (Q, D) L2-normalised query descriptors.

        Args:
            index: the index the calibration was made on.
            vectors: the queries.
            neighbours: voting neighbours to list per answer (0: none).

        Returns:
            Per query {'landmark' (cluster id or None: unknown), 'candidate' (the vote's winner or
            None), 'confidence', 'threshold', 'neighbours' [{'image_id', 'score', 'cluster'}]}.
        """
        q = np.ascontiguousarray(np.asarray(vectors, np.float32).reshape(-1, index.dim))
        with index.lock:
            scores, nbrs = index.search(q, self.config.k)
            cl = _neighbour_clusters(index, nbrs, self.clusters)
            names = [[index.record(int(lab))["image_id"] if lab >= 0 else None for lab in row[:neighbours]]
                     for row in nbrs]
        pred, conf = vote(scores, cl, self.config.power, self.config.confidence)
        t = self.calibration.threshold
        out = []
        for i in range(q.shape[0]):
            known = t is not None and pred[i] >= 0 and conf[i] >= t
            out.append({
                "landmark": int(pred[i]) if known else None,
                "candidate": int(pred[i]) if pred[i] >= 0 else None,
                "confidence": float(conf[i]), "threshold": t,
                "neighbours": [{"image_id": name, "score": float(scores[i, j]),
                                "cluster": int(cl[i, j]) if cl[i, j] >= 0 else None}
                               for j, name in enumerate(names[i]) if name is not None],
            })
        return out
