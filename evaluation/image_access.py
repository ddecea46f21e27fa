"""What image-level re-ranking steps read of a benchmark, loaded on demand and cached."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from raytrieval.evaluation.datasets import Benchmark
from raytrieval.evaluation.rerank import ImageAccess
from raytrieval.retrieval.features import FeatureCache
from raytrieval.retrieval.imageio import crop_box, load_image
from raytrieval.retrieval.region import RegionSet, proposal_descriptors, region_descriptors
from raytrieval.retrieval.source import ModelSource, load_model


def benchmark_access(bench: Benchmark, source: ModelSource, regions: str | None = None,
                     casr_pool: str = "sum") -> ImageAccess:
    """Cached local features and region descriptors of `bench`'s images, for `rerank`.

    Args:
        bench: the benchmark.
        source: the model whose descriptors are re-ranked (regions are pooled with it; SIFT
            runs at its extraction size, keypoints in pixels of the stored image).
        regions: `regions.parquet` of learned proposals keyed by image name (file stem);
            None: the label-free grid proposals.
        casr_pool: how proposal descriptors are pooled, 'sum' (RPA-sum) or 'max'.
    """
    _, max_size = source.preprocessing()
    cache = FeatureCache(max_side=max_size, max_features=2000, capacity=None)
    model = None

    def loaded():
        nonlocal model
        model = model or load_model(source)
        return model

    learned = None
    if regions:
        from raytrieval.retrieval.regions import read_regions, regions_by_image

        learned = regions_by_image(read_regions(regions))

    @lru_cache(maxsize=None)
    def db_regions(i: int) -> RegionSet:
        return region_descriptors(loaded(), bench.images[i], max_size)

    @lru_cache(maxsize=None)
    def proposals(i: int) -> RegionSet:
        boxes = None
        if learned is not None:
            name = Path(bench.images[i]).stem
            if name not in learned:
                raise ValueError(f"regions: no proposals for image {name!r} in {regions}")
            boxes = learned[name][0]
        return proposal_descriptors(loaded(), bench.images[i], boxes, max_size, pool=casr_pool)

    @lru_cache(maxsize=None)
    def query_region(q: int) -> np.ndarray:
        """The query box pooled like the proposals: the crop as one whole-image proposal."""
        img = load_image(bench.queries[q])
        crop = crop_box(img, bench.qboxes[q]) if bench.qboxes[q] is not None else img
        whole = np.array([[0, 0, *crop.size]], np.float32)
        return proposal_descriptors(loaded(), crop, whole, max_size, pool=casr_pool).descriptors[0]

    return ImageAccess(
        query_features=lambda q: cache.get(("query", q), bench.queries[q], bench.qboxes[q]).stored,
        db_features=lambda i: cache.get(("db", i), bench.images[i]).stored,
        db_regions=db_regions,
        query_region=query_region,
        db_proposals=proposals,
    )
