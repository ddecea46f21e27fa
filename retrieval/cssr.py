"""Class-specific spatial re-ranking (CS-SR, Salvador et al. 2016) over pseudo-landmark classes.

Salvador et al. fine-tune the detector's box classifier on the query objects and score each of
a query's top-N images by the probability of the query's class for its best box. Here nothing
is labelled: the classes are the verified clusters of the clean stage (`clusters.parquet`), and
the box classifier is a linear softmax over the RoIAlign proposal descriptors of the frozen
retrieval model (`proposal_descriptors`, pooled like the `casr` step), plus a background class.
Its training examples (`train_box_classifier`), from clustered images only:

- positives, labelled with the image's cluster: the verified inlier box; the same box cropped
  and pooled as a whole image, as a query box is (`crops`); the proposals with IoU >= `pos_iou`
  to the box;
- background: the proposals with IoU < `neg_iou` to the box (at most `max_background` per
  image, drawn with the seed). Unclustered images give none: they may show a landmark that
  verification missed. Proposals in between are left out (the Faster R-CNN rule).

Classes are weighted inversely to their example counts, so the rare positives weigh as much as
the many background boxes.

At query time (`cssr_rerank`) the query box, pooled like the proposals, is classified. A query
whose most probable class is the background, or whose most probable class has a probability
below `min_confidence`, has no known class and falls back to CA-SR (`casr_rerank`). The default
`DEFAULT_MIN_CONFIDENCE` = 0.5 is a fixed, benchmark-free rule: the query's class must be more
probable than all other classes and the background together. Otherwise each top-N image is
scored by its proposal most probable under the query's class; it is localised by the class's
evidence map over its conv cells (`similarity_box` of `BoxClassifier.class_direction`), or by that
proposal where the region set has no cells.

The classifier is one small file (`BoxClassifier.save`, `load_box_classifier`): a torch.save of
plain tensors, the class list and a meta dict, read back with `weights_only=True`.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch
from PIL import Image

from raytrieval.retrieval.artifacts import atomic_open
from raytrieval.retrieval.extract import ImageSource
from raytrieval.retrieval.imageio import crop_box, load_image
from raytrieval.retrieval.model import RetrievalNet
from raytrieval.retrieval.region import (
    REGION_POOLS, RegionSet, best_regions, casr_rerank, proposal_descriptors, similarity_box,
)

__all__ = [
    "BOX_CLASSIFIER_FILE", "DEFAULT_MIN_CONFIDENCE", "BoxClassifier", "BoxClassifierConfig", "CssrResult",
    "box_iou", "cssr_rerank", "fit_box_classifier", "load_box_classifier", "region_labels",
    "train_box_classifier", "train_from_run",
]

BOX_CLASSIFIER_FILE = "box_classifier.pt"
DEFAULT_MIN_CONFIDENCE = 0.5
_FORMAT = "raytrieval-box-classifier"
_VERSION = 1
_IGNORED, _BACKGROUND = -2, -1  # region_labels' codes besides positives


@dataclass
class BoxClassifierConfig:
    """How the box classifier is trained (examples from clustered images, then Adam).

    Args:
        pos_iou: proposals with at least this IoU to an image's verified box are its positives.
        neg_iou: proposals with less than this IoU to the box are background.
        max_background: background proposals kept per image (a seeded draw; None: all).
        crops: also use each verified box cropped and pooled as a whole image (as queries are).
        pool: pooling of the region descriptors, 'sum' or 'max'; must be the `casr_pool` of the
            re-ranking that uses the classifier.
        max_size: longer image side before the backbone (None: the model's `max_size`).
        steps: Adam steps.
        lr: Adam learning rate.
        weight_decay: L2 penalty on the weights (keeps probabilities of unseen boxes moderate).
        batch_size: examples per step (all of them when fewer).
        seed: seed of the background draw and of the batches.
    """

    pos_iou: float = 0.5
    neg_iou: float = 0.3
    max_background: int | None = 128
    crops: bool = True
    pool: str = "sum"
    max_size: int | None = None
    steps: int = 300
    lr: float = 0.01
    weight_decay: float = 0.03
    batch_size: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.neg_iou <= self.pos_iou <= 1.0:
            raise ValueError(f"neg_iou, pos_iou: need 0 <= neg_iou <= pos_iou <= 1, got {self.neg_iou}, {self.pos_iou}")
        if self.max_background is not None and self.max_background < 1:
            raise ValueError(f"max_background: must be >= 1 or None, got {self.max_background}")
        if self.pool not in REGION_POOLS:
            raise ValueError(f"pool: must be one of {REGION_POOLS}, got {self.pool!r}")
        if self.max_size is not None and self.max_size < 32:
            raise ValueError(f"max_size: must be >= 32, got {self.max_size}")
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"lr, weight_decay: need lr > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")


class BoxClassifier:
    """Linear softmax over centred, scaled region descriptors: the pseudo-landmark classes, then background.

    Column j < C of the probabilities is cluster `classes[j]`; column C (`background`) is the
    background.

    Args:
        weight: (C + 1, D) float32.
        bias: (C + 1,) float32.
        mean: (D,) float32 descriptor mean of the training examples.
        std: (D,) float32 divisor of the centred descriptors (one scale repeated by
            `fit_box_classifier`).
        classes: the C cluster ids.
        meta: JSON-like facts (pooling, max_size, example counts, training config).
    """

    def __init__(self, weight: np.ndarray, bias: np.ndarray, mean: np.ndarray, std: np.ndarray,
                 classes: Sequence[int], meta: dict[str, Any] | None = None):
        self.weight = np.ascontiguousarray(weight, np.float32)
        self.bias = np.ascontiguousarray(bias, np.float32).reshape(-1)
        self.mean = np.ascontiguousarray(mean, np.float32).reshape(-1)
        self.std = np.ascontiguousarray(std, np.float32).reshape(-1)
        self.classes = tuple(int(c) for c in classes)
        self.meta = dict(meta or {})
        k, d = self.weight.shape if self.weight.ndim == 2 else (-1, -1)
        if k != len(self.classes) + 1 or self.bias.shape != (k,) or self.mean.shape != (d,) or self.std.shape != (d,):
            raise ValueError(f"box classifier: weight {self.weight.shape}, bias {self.bias.shape}, mean "
                             f"{self.mean.shape}, std {self.std.shape} do not fit {len(self.classes)} classes + background")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"box classifier: repeated class ids in {self.classes}")

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    @property
    def background(self) -> int:
        """The background's column."""
        return len(self.classes)

    @property
    def pool(self) -> str:
        """The pooling of the descriptors it was trained on ('sum' or 'max')."""
        return str(self.meta.get("pool", "sum"))

    def class_index(self, cluster_id: int) -> int:
        """The column of a cluster id."""
        try:
            return self.classes.index(int(cluster_id))
        except ValueError:
            raise ValueError(f"cluster_id: {cluster_id} is not a class of the box classifier") from None

    def class_direction(self, k: int) -> np.ndarray:
        """(D,) float32 direction whose dot product with a descriptor is, up to a constant, the
        log-odds of column `k` against the background (what `cssr_rerank` localises with)."""
        return ((self.weight[k] - self.weight[self.background]) / self.std).astype(np.float32)

    def log_proba(self, descriptors: np.ndarray) -> np.ndarray:
        """(R, C + 1) float64 log-probabilities of (R, D) region descriptors."""
        x = np.asarray(descriptors, np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"descriptors: expected (R, {self.dim}), got {x.shape}")
        z = ((x - self.mean) / self.std).astype(np.float64) @ self.weight.T.astype(np.float64) + self.bias  # (R, C + 1)
        z -= z.max(axis=1, keepdims=True)
        return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    def predict_proba(self, descriptors: np.ndarray) -> np.ndarray:
        """(R, C + 1) float32 class probabilities of (R, D) region descriptors (rows sum to 1)."""
        return np.exp(self.log_proba(descriptors)).astype(np.float32)

    def save(self, path: str | os.PathLike) -> Path:
        """Atomically write the classifier (plain tensors, class list and meta; see `load_box_classifier`)."""
        payload = {
            "format": _FORMAT,
            "version": _VERSION,
            "classes": list(self.classes),
            "meta": self.meta,
            "state": {name: torch.from_numpy(getattr(self, name).copy()) for name in ("weight", "bias", "mean", "std")},
        }
        with atomic_open(path) as f:
            torch.save(payload, f)
        return Path(path)


def load_box_classifier(path: str | os.PathLike) -> BoxClassifier:
    """Read a classifier written by `BoxClassifier.save` (`torch.load(weights_only=True)`).

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not a box classifier (another torch file, or not a torch file).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"box classifier: no file {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one holding more than plain data
        raise ValueError(f"box classifier: {path} is not a box classifier file ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
        raise ValueError(f"box classifier: {path} is not a box classifier file (no {_FORMAT!r} format tag; "
                         f"write one with `raytrieval box-classifier`)")
    if payload.get("version") != _VERSION:
        raise ValueError(f"box classifier: {path} has version {payload.get('version')!r}, this code reads {_VERSION}")
    state = payload.get("state")
    if not isinstance(state, dict) or not all(isinstance(state.get(k), torch.Tensor)
                                              for k in ("weight", "bias", "mean", "std")):
        raise ValueError(f"box classifier: {path} lacks its weight, bias, mean and std tensors")
    return BoxClassifier(**{k: state[k].numpy() for k in ("weight", "bias", "mean", "std")},
                         classes=payload.get("classes", []), meta=payload.get("meta"))


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of (N, 4) and (M, 4) boxes (x0, y0, x1, y1), by `torchvision.ops.box_iou`, as numpy."""
    from torchvision.ops import box_iou as tv_box_iou

    as_t = lambda x: torch.as_tensor(np.asarray(x, np.float64).reshape(-1, 4))  # noqa: E731
    return tv_box_iou(as_t(a), as_t(b)).numpy()


def region_labels(proposals: np.ndarray, box: np.ndarray, label: int, pos_iou: float, neg_iou: float) -> np.ndarray:
    """Training label of each proposal of an image with verified `box` in class `label`.

    Returns:
        (R,) int64: `label` where IoU >= pos_iou, -1 (background) where IoU < neg_iou, -2
        (left out) in between.
    """
    iou = box_iou(proposals, box)[:, 0]
    out = np.full(len(iou), _IGNORED, np.int64)
    out[iou < neg_iou] = _BACKGROUND
    out[iou >= pos_iou] = label
    return out


def fit_box_classifier(X: np.ndarray, y: np.ndarray, classes: Sequence[int], config: BoxClassifierConfig | None = None,
                       meta: dict[str, Any] | None = None) -> BoxClassifier:
    """Softmax regression on (N, D) descriptors with column labels (N,) in [0, C] (C: background).

    Features centred and divided by one scale (their mean per-dimension standard deviation;
    per-dimension scaling blows up near-constant dimensions and overfits the few positives),
    zero-initialised weights, class-balanced cross-entropy, Adam with
    weight decay; seeded batches, so the result is reproducible on one machine.
    """
    cfg = config or BoxClassifierConfig()
    X = np.ascontiguousarray(X, np.float32)
    y = np.asarray(y, np.int64).reshape(-1)
    c = len(classes)
    if X.ndim != 2 or len(X) != len(y) or len(X) == 0:
        raise ValueError(f"X, y: expected (N, D) and (N,) with N >= 1, got {X.shape} and {y.shape}")
    if c < 1 or y.min() < 0 or y.max() > c:
        raise ValueError(f"y: labels must lie in [0, {c}] for {c} classes")
    mean = X.mean(axis=0)
    std = np.full(X.shape[1], X.std(axis=0).mean() + 1e-6, np.float32)  # one scale: per-dimension overfits
    counts = np.bincount(y, minlength=c + 1).astype(np.float64)
    present = counts > 0
    weights = np.where(present, len(y) / (present.sum() * np.maximum(counts, 1)), 0.0)
    xs = torch.from_numpy((X - mean) / std)
    ys = torch.from_numpy(y)
    gen = torch.Generator().manual_seed(cfg.seed)
    linear = torch.nn.Linear(X.shape[1], c + 1)
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.Adam(linear.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(weight=torch.tensor(weights, dtype=torch.float32))
    with torch.enable_grad():
        for _ in range(cfg.steps):
            idx = torch.randperm(len(ys), generator=gen)[: cfg.batch_size] if len(ys) > cfg.batch_size else slice(None)
            opt.zero_grad()
            loss = loss_fn(linear(xs[idx]), ys[idx])
            loss.backward()
            opt.step()
    info = {**(meta or {}), "pool": cfg.pool, "config": asdict(cfg), "final_loss": float(loss.detach()),
            "examples": {"positive": int(counts[:c].sum()), "background": int(counts[c])}}
    return BoxClassifier(linear.weight.detach().numpy(), linear.bias.detach().numpy(), mean, std, classes, info)


def _image_examples(model: RetrievalNet, src: ImageSource, box: np.ndarray, label: int,
                    proposals: np.ndarray | None, cfg: BoxClassifierConfig, max_size: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(descriptors (n, D), labels (n,) cluster id or -1 background) of one clustered image."""
    img = src if isinstance(src, Image.Image) else load_image(src)
    props = proposal_descriptors(model, img, proposals, max_size, pool=cfg.pool)  # (R, D), grid when None
    labels = region_labels(props.boxes, box, label, cfg.pos_iou, cfg.neg_iou)
    bg = np.flatnonzero(labels == _BACKGROUND)
    if cfg.max_background is not None and len(bg) > cfg.max_background:
        bg = np.sort(rng.choice(bg, cfg.max_background, replace=False))
    keep = np.concatenate([np.flatnonzero(labels == label), bg])
    parts = [proposal_descriptors(model, img, box[None], max_size, pool=cfg.pool).descriptors, props.descriptors[keep]]
    if cfg.crops:
        crop = crop_box(img, box)
        whole = np.array([[0, 0, *crop.size]], np.float32)
        parts.insert(1, proposal_descriptors(model, crop, whole, max_size, pool=cfg.pool).descriptors)
    return np.concatenate(parts), np.concatenate([np.full(len(parts) - 1, label), labels[keep]])


def train_box_classifier(
    model: RetrievalNet, images: Sequence[ImageSource], labels: Sequence[int], boxes: np.ndarray | Sequence,
    proposals: Sequence[np.ndarray | None] | None = None, config: BoxClassifierConfig | None = None,
) -> BoxClassifier:
    """Train the CS-SR box classifier label-free on clustered images (see the module docstring).

    Args:
        model: the frozen retrieval model whose re-ranking will use the classifier.
        images: the clustered images (paths, bytes or PIL images).
        labels: (N,) cluster id of each image (the pseudo-landmark classes).
        boxes: (N, 4) verified box of each image, (x0, y0, x1, y1) in pixels of the stored image.
        proposals: per image (R_i, 4) proposals in pixels (e.g. `regions.parquet`) or None for
            the grid proposals; None: grid proposals for every image.
        config: example selection and training.

    Returns:
        The trained BoxClassifier, classes sorted by cluster id.
    """
    cfg = config or BoxClassifierConfig()
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    labels = [int(v) for v in labels]
    proposals = list(proposals) if proposals is not None else [None] * len(images)
    if not len(images) == len(labels) == len(boxes) == len(proposals):
        raise ValueError(f"images, labels, boxes, proposals: {len(images)}, {len(labels)}, {len(boxes)}, "
                         f"{len(proposals)} entries")
    bad = np.flatnonzero(~np.isfinite(boxes).all(axis=1) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1]))
    if len(bad):
        raise ValueError(f"boxes: image {int(bad[0])} has no valid box {boxes[bad[0]].tolist()}")
    if not labels:
        raise ValueError("images: no clustered image to train the box classifier on")
    if min(labels) < 0:
        raise ValueError(f"labels: cluster ids must be >= 0, got {min(labels)}")
    classes = sorted(set(labels))
    column = {c: j for j, c in enumerate(classes)}
    max_size = cfg.max_size or int(model.spec.max_size)
    rng = np.random.default_rng(cfg.seed)
    xs, ys = [], []
    for src, label, box, props in zip(images, labels, boxes, proposals):
        x, y = _image_examples(model, src, box, label, props, cfg, max_size, rng)
        xs.append(x)
        ys.append(np.array([len(classes) if v == _BACKGROUND else column[int(v)] for v in y], np.int64))
    y = np.concatenate(ys)
    if not (y == len(classes)).any():
        raise ValueError("proposals: no proposal has IoU < neg_iou to its image's box, so there is no background "
                         "example; give more (or smaller) proposals")
    meta = {"max_size": max_size, "dim": int(xs[0].shape[1]), "images": len(labels)}
    return fit_box_classifier(np.concatenate(xs), y, classes, cfg, meta)


class CssrResult(NamedTuple):
    """`cssr_rerank`'s answer: casr_rerank's triple, and whether it fell back to CA-SR."""

    ranks: np.ndarray  # (Ndb,)
    scores: np.ndarray  # (top_n,) in the new order
    boxes: np.ndarray  # (top_n, 4) in the new order
    fell_back: bool


def cssr_rerank(
    query: np.ndarray, regions: Sequence[RegionSet], ranks_row: np.ndarray, top_n: int, classifier: BoxClassifier,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE, qe: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
    whiten: Callable[[np.ndarray], np.ndarray] | None = None,
) -> CssrResult:
    """Class-specific spatial re-ranking (CS-SR, Salvador et al. 2016) of one query's top N.

    The query descriptor is classified as a region. Background, or a top probability below
    `min_confidence`: an unknown class, and the answer is `casr_rerank`'s. Otherwise each top-N
    image is scored by max over its proposals of P(query class | proposal), and that proposal
    is its box; where the region set has its conv cells, the box is instead `similarity_box` of
    the class's evidence map (each cell's log-odds of the query class against background,
    `BoxClassifier.class_direction`), which follows the object's extent where a proposal
    classifier prefers the object's most distinctive part. Ties are broken by float64
    log-probabilities, then by rank. With `qe`, query
    expansion follows as in `casr_rerank`: the query is expanded with the best proposals of
    the re-ranked list (by class probability) and the top N re-scored by CA-SR similarity; the
    boxes stay the class-specific ones.

    Args:
        query: (D,) query descriptor, pooled like the proposals (the classifier's input).
        regions: region sets of the images `ranks_row[:top_n]`, in that order.
        ranks_row: (Ndb,) the filtering ranking.
        top_n: how many leading images to re-rank (the rest keep their order).
        classifier: the box classifier (trained on descriptors pooled like these).
        min_confidence: least probability of the query's class to use it.
        qe: (query (D,), best region descriptors (n, D) by decreasing score) -> expanded query;
            None for no expansion.
        whiten: applied to the query and region descriptors before similarities (CA-SR fallback
            and query expansion); the classifier always reads them as given. None: identity.

    Returns:
        CssrResult(new ranks_row (Ndb,), scores (top_n,) and boxes (top_n, 4) in the new order,
        fell_back). Scores are probabilities of the query's class, similarities after `qe` or
        when it fell back.
    """
    top_n = min(top_n, len(ranks_row))
    if len(regions) != top_n:
        raise ValueError(f"regions: {len(regions)} region sets for top_n={top_n}")
    sim_query, sim_sets = query, regions
    if whiten is not None:
        sim_query = whiten(query[None])[0]
        sim_sets = [RegionSet(whiten(rs.descriptors), rs.boxes) for rs in regions]
    logp = classifier.log_proba(np.asarray(query)[None])[0]  # (C + 1,)
    k = int(np.argmax(logp))
    if k == classifier.background or np.exp(logp[k]) < min_confidence:
        return CssrResult(*casr_rerank(sim_query, sim_sets, ranks_row, top_n, qe), fell_back=True)
    log_scores = np.empty(top_n, np.float64)
    best = np.empty(top_n, np.int64)
    for i, rs in enumerate(regions):
        if len(rs.descriptors) == 0:
            raise ValueError(f"regions: region set {i} has no regions")
        lp = classifier.log_proba(rs.descriptors)[:, k]  # (R,)
        best[i] = int(np.argmax(lp))
        log_scores[i] = lp[best[i]]
    order = np.argsort(-log_scores, kind="stable")
    scores = np.exp(log_scores).astype(np.float32)
    best_p = best  # the most probable proposal of each image
    if qe is not None:
        found = np.stack([sim_sets[i].descriptors[best[i]] for i in order])  # (top_n, D)
        scores, _ = best_regions(qe(sim_query, found), sim_sets)
        order = np.argsort(-scores, kind="stable")
    direction = classifier.class_direction(k)
    boxes = np.stack([similarity_box(regions[i], direction) if regions[i].cells is not None else regions[i].boxes[best_p[i]]
                      for i in order]).astype(np.float32).reshape(-1, 4)
    new = np.concatenate([ranks_row[:top_n][order], ranks_row[top_n:]])
    return CssrResult(new, scores[order], boxes, fell_back=False)


def train_from_run(
    run_dir: str | os.PathLike, model: Any, regions: str | os.PathLike | None = None,
    config: BoxClassifierConfig | None = None, out: str | os.PathLike | None = None,
) -> Path:
    """Train the box classifier on a run directory's clusters and write it.

    Args:
        run_dir: holds `images.parquet` and `clusters.parquet` (the clean stage's).
        model: the retrieval model: a `RetrievalNet`, or anything `load_model` reads (a
            checkpoint directory, a `ModelSource`, a `ModelSpec` dict form).
        regions: `regions.parquet` of learned proposals keyed by image_id; None: grid proposals.
        config: example selection and training.
        out: the file to write (default: `run_dir/box_classifier.pt`).

    Returns:
        The written file.
    """
    from raytrieval.retrieval.clusters import read_clusters
    from raytrieval.retrieval.manifest import ok_images, read_manifest
    from raytrieval.retrieval.source import load_model

    run = Path(run_dir)
    for name in ("images.parquet", "clusters.parquet"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run / name} does not exist: run `raytrieval clean --run-dir {run}` first")
    manifest = ok_images(read_manifest(run / "images.parquet"))
    uri = dict(zip(manifest.column("image_id").to_pylist(), manifest.column("uri").to_pylist()))
    clusters = read_clusters(run / "clusters.parquet").to_pydict()
    rows = [(i, c, b) for i, c, b in zip(clusters["image_id"], clusters["cluster_id"], clusters["box"])
            if b is not None and i in uri]
    if not rows:
        raise ValueError(f"clusters: no clustered image of {run / 'images.parquet'} has a box")
    proposals = None
    if regions is not None:
        from raytrieval.retrieval.regions import read_regions, regions_by_image

        learned = regions_by_image(read_regions(regions))
        missing = [i for i, _, _ in rows if i not in learned]
        if missing:
            raise ValueError(f"regions: no proposals for image {missing[0]!r} in {regions}")
        proposals = [learned[i][0] for i, _, _ in rows]
    if not isinstance(model, RetrievalNet):
        model = load_model(model)
    classifier = train_box_classifier(model, [uri[i] for i, _, _ in rows], [c for _, c, _ in rows],
                                      np.asarray([b for _, _, b in rows], np.float32), proposals, config)
    classifier.meta.update(run_dir=os.fspath(run), regions=os.fspath(regions) if regions else None)
    return classifier.save(Path(out) if out else run / BOX_CLASSIFIER_FILE)
