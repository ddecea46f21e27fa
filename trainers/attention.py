"""Train the regional-attention head on the clean stage's pseudo-landmarks, backbone frozen.

The classes are the verified clusters of the clean stage (`clusters.parquet`), as Kim et al.
(2018) train their attention on landmark classes. The frozen backbone's conv maps of the
clustered images are computed once and kept in memory (fine for collections of a few thousand
images at 512 px; about 1 MB per image and scale for EfficientNet-Lite0), then only the
attention scorer and a cosine classifier over the classes are trained with cross-entropy. The
classifier is discarded; the result is a normal retrieval checkpoint (`save_checkpoint`) that
`raytrieval eval --checkpoint`, `index` and `serve` load like any other.

When to stop is decided without labels, as fine-tuning's best epoch is: with the split stage's
`split.parquet`, only the training clusters are trained on, and after every epoch the
self-mAP (`raytrieval.evaluation.selfval`) of the validation clusters' images, searched among
all clustered images, is measured; the head of the best epoch is kept (the untrained head,
epoch 0, included: training that never helps is not kept), and training stops after
`patience` epochs without a gain. Without a split (or with no validation cluster of two
images) the stated fallback is training on every cluster for `epochs` epochs, recorded as
such in the checkpoint's meta.

    raytrieval attention --run-dir runs/x --out runs/x/attention

Numbers: `benchmarks/heads.md`.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raytrieval.retrieval.checkpoint import load_checkpoint, read_meta, save_checkpoint
from raytrieval.retrieval.clusters import read_clusters
from raytrieval.retrieval.extract import power_mean, prepare_image, scale_features
from raytrieval.retrieval.manifest import ok_images, read_manifest
from raytrieval.retrieval.model import ModelSpec, RetrievalNet, spec_from_meta
from raytrieval.retrieval.pooling import Attention, l2n


@dataclass
class AttentionConfig:
    """Training of the attention head.

    Args:
        run_dir: the clean stage's run directory (images.parquet, clusters.parquet).
        out: checkpoint directory to write (replaced if it exists).
        checkpoint: retrieval checkpoint whose backbone (and scales, max_size) is used, and whose
            scorer too when its pooling is already `attention`; None: the off-the-shelf
            ImageNet backbone. A base checkpoint's whitening is dropped (its input changes).
        max_size: longer image side of the conv maps (and of the saved model) without a checkpoint.
        hidden: width of the scorer's hidden layer; None: C // 8.
        epochs: most passes over the training clusters' images.
        patience: epochs without a self-mAP gain before training stops (with validation clusters).
        lr: AdamW learning rate of the scorer and the classifier.
        weight_decay: AdamW weight decay.
        batch_size: conv maps per step (same-size maps only).
        scale: logit scale of the cosine classifier.
        min_cluster_size: clusters with fewer images are left out.
        seed: seed of the classifier's initialisation and of the batch order.
    """

    run_dir: str
    out: str
    checkpoint: str | None = None
    max_size: int = 512
    hidden: int | None = None
    epochs: int = 30
    patience: int = 5
    lr: float = 1e-3
    weight_decay: float = 1e-4
    batch_size: int = 16
    scale: float = 16.0
    min_cluster_size: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "patience", "batch_size", "min_cluster_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {value!r}")
        if self.max_size < 32:
            raise ValueError(f"max_size: must be >= 32, got {self.max_size}")
        if not self.lr > 0 or self.weight_decay < 0 or not self.scale > 0:
            raise ValueError(f"lr, scale: must be > 0, weight_decay >= 0; got {self.lr}, {self.scale}, {self.weight_decay}")
        if self.checkpoint is not None and not (Path(self.checkpoint) / "meta.json").is_file():
            raise ValueError(f"checkpoint: no meta.json in {self.checkpoint}")


def nearest_mean_accuracy(x: np.ndarray, labels: np.ndarray) -> float:
    """Leave-one-out nearest-class-mean accuracy of L2-normalised descriptors (cosine).

    Args:
        x: (N, D) descriptors.
        labels: (N,) class of each; classes with one member count as wrong (no mean left).
    """
    x = np.asarray(x, np.float64)
    classes, inv = np.unique(labels, return_inverse=True)
    sums = np.zeros((classes.size, x.shape[1]))
    np.add.at(sums, inv, x)
    counts = np.bincount(inv, minlength=classes.size).astype(np.float64)
    sims = np.empty((x.shape[0], classes.size))
    for i in range(x.shape[0]):
        s, c = sums.copy(), counts.copy()
        s[inv[i]] -= x[i]
        c[inv[i]] -= 1
        means = s / np.maximum(c, 1)[:, None]
        means /= np.linalg.norm(means, axis=1, keepdims=True) + 1e-12
        sims[i] = means @ x[i]
        sims[i, c == 0] = -np.inf
    return float((sims.argmax(axis=1) == inv).mean())


@torch.no_grad()
def pooled(pool: nn.Module, maps: Sequence[torch.Tensor]) -> np.ndarray:
    """L2-normalised pooled descriptors (N, C) of conv maps [(C, h, w)] one by one."""
    return np.stack([l2n(pool(m[None]))[0].numpy() for m in maps]).astype(np.float32)


def _batches(maps: Sequence[torch.Tensor], batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, m in enumerate(maps):
        by_shape[tuple(m.shape)].append(i)
    out = []
    for idx in by_shape.values():
        idx = rng.permutation(idx)
        out.extend(idx[s : s + batch_size] for s in range(0, idx.size, batch_size))
    return [out[j] for j in rng.permutation(len(out))]


def fit_attention(pool: Attention, maps: Sequence[torch.Tensor], labels: np.ndarray, cfg: AttentionConfig,
                  validate: Callable[[], float] | None = None) -> dict[str, Any]:
    """Train `pool` in place to classify conv maps into `labels` with a cosine classifier.

    Args:
        pool: the attention head (its parameters are trained, nothing else).
        maps: frozen conv maps [(C, h, w)], any sizes.
        labels: (N,) class indices 0..K-1.
        cfg: epochs, patience, lr, weight_decay, batch_size, scale, seed.
        validate: the label-free score of `pool` as it is now (higher is better), measured
            before training and after every epoch; `pool` ends with the parameters of the best
            score and training stops after `cfg.patience` epochs without a gain. None: train
            `cfg.epochs` epochs and keep the last.

    Returns:
        Losses and accuracies: classifier accuracy of the last epoch trained, the leave-one-out
        nearest-class-mean accuracy of the pooled descriptors before and after (a retrieval-like
        check that does not depend on the discarded classifier), and with `validate`: the epoch
        kept ('best_epoch', 0 for the untrained head), its score and the score of every epoch.
    """
    labels = np.asarray(labels, np.int64)
    if len(maps) != labels.size or labels.size == 0:
        raise ValueError(f"fit_attention: {len(maps)} maps for {labels.size} labels")
    num_classes = int(labels.max()) + 1
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    classifier = nn.Parameter(torch.randn(num_classes, maps[0].shape[0]) * 0.01)
    params = [*pool.parameters(), classifier]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    y_all = torch.from_numpy(labels)
    before = nearest_mean_accuracy(pooled(pool, maps), labels)
    history = []
    best = (validate(), 0, copy.deepcopy(pool.state_dict())) if validate is not None else None
    scores = [best[0]] if best is not None else []
    for epoch in range(1, cfg.epochs + 1):
        pool.train()
        total, right, loss_sum = 0, 0, 0.0
        for idx in _batches(maps, cfg.batch_size, rng):
            x = torch.stack([maps[i] for i in idx])  # (B, C, h, w)
            y = y_all[idx]
            logits = cfg.scale * l2n(pool(x)) @ l2n(classifier).T  # (B, K)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += len(idx)
            right += int((logits.argmax(1) == y).sum())
            loss_sum += float(loss.detach()) * len(idx)
        pool.eval()
        history.append({"epoch": epoch, "loss": loss_sum / total, "accuracy": right / total})
        if best is not None:
            scores.append(validate())
            history[-1]["self_map"] = scores[-1]
            if scores[-1] > best[0]:
                best = (scores[-1], epoch, copy.deepcopy(pool.state_dict()))
            elif epoch - best[1] >= cfg.patience:
                break
    pool.eval()
    out: dict[str, Any] = {"loss": history[-1]["loss"], "accuracy": history[-1]["accuracy"],
                           "epochs_trained": len(history)}
    if best is not None:
        pool.load_state_dict(best[2])
        out |= {"best_epoch": best[1], "self_map": best[0], "self_map_by_epoch": scores}
    after = nearest_mean_accuracy(pooled(pool, maps), labels)
    return out | {"nearest_mean_accuracy_before": before, "nearest_mean_accuracy_after": after, "history": history}


@torch.no_grad()
def conv_maps(model: RetrievalNet, uris: Sequence[str], scales: Sequence[float], max_size: int) -> list[list[torch.Tensor]]:
    """Frozen conv maps of each image at each scale: [[(C, h, w) per scale] per image]."""
    model.eval()
    return [[f[0].contiguous() for f in scale_features(model, prepare_image(u, None, max_size)[None], scales)]
            for u in uris]


def attention_model(cfg: AttentionConfig) -> RetrievalNet:
    """The net to train: the base checkpoint's (or ImageNet) backbone with an attention head."""
    if cfg.checkpoint is None:
        kwargs = {} if cfg.hidden is None else {"hidden": cfg.hidden}
        return RetrievalNet(ModelSpec(pooling="attention", pooling_kwargs=kwargs, max_size=cfg.max_size)).eval()
    base = load_checkpoint(cfg.checkpoint)
    if base.spec.pooling == "attention" and base.whiten is None:
        return base
    spec = spec_from_meta(read_meta(cfg.checkpoint))
    kwargs = {} if cfg.hidden is None else {"hidden": cfg.hidden}
    model = RetrievalNet(ModelSpec(backbone=spec.backbone, pooling="attention", pooling_kwargs=kwargs,
                                   max_size=spec.max_size, scales=spec.scales, weights=None))
    model.backbone.load_state_dict(base.backbone.state_dict())
    return model.eval()


def _image_descriptors(pool: nn.Module, per_image: Sequence[Sequence[torch.Tensor]], power: float) -> np.ndarray:
    """(N, C) descriptors of images from their conv maps, power-averaged over scales as extraction does."""
    with torch.no_grad():
        return np.stack([power_mean([l2n(pool(m[None])) for m in maps], power)[0].numpy()
                         for maps in per_image]).astype(np.float32)


def _validation(run: Path, ids: Sequence[str], clusters: Sequence[int]) -> tuple[np.ndarray, str]:
    """(val (N,) bool over `ids`, the rule applied): the split stage's validation clusters, or
    none (the fallback) without `split.parquet` or without a validation cluster of two images."""
    from raytrieval.mining.split import SPLIT_FILE, validation_ids

    if not (run / SPLIT_FILE).is_file():
        return np.zeros(len(ids), bool), (f"no {SPLIT_FILE} (run the split stage): trained on every cluster "
                                          "for the configured epochs, unvalidated")
    held = validation_ids(run / SPLIT_FILE)
    val = np.array([i in held for i in ids], bool)
    sizes = np.bincount(np.asarray(clusters)[val]) if val.any() else np.zeros(0, np.int64)
    if not (sizes >= 2).any():
        return np.zeros(len(ids), bool), ("no validation cluster of two images: trained on every cluster for the "
                                          "configured epochs, unvalidated")
    return val, (f"best epoch by self-mAP of {int(val.sum())} images of {int((sizes >= 2).sum())} validation "
                 "clusters (split.parquet), searched among all clustered images")


def train_attention(cfg: AttentionConfig) -> dict[str, Any]:
    """Train the attention head on the clean stage's clusters and save a retrieval checkpoint.

    Returns:
        The training facts recorded in the checkpoint's meta (`attention_training`, with the
        stopping rule applied), plus the checkpoint path.
    """
    from raytrieval.evaluation.selfval import self_map, selfval_set

    run = Path(cfg.run_dir)
    for name in ("images.parquet", "clusters.parquet"):
        if not (run / name).is_file():
            raise FileNotFoundError(f"{run / name} does not exist: run `raytrieval clean --run-dir {run}` first")
    manifest = ok_images(read_manifest(run / "images.parquet"))
    uri = dict(zip(manifest.column("image_id").to_pylist(), manifest.column("uri").to_pylist()))
    clusters = read_clusters(run / "clusters.parquet")
    members: dict[int, list[str]] = defaultdict(list)
    for image_id, cluster in zip(clusters.column("image_id").to_pylist(), clusters.column("cluster_id").to_pylist()):
        if image_id in uri:
            members[int(cluster)].append(image_id)
    kept = sorted(c for c, ids in members.items() if len(ids) >= cfg.min_cluster_size)
    ids = [i for c in kept for i in members[c]]
    image_labels = np.array([k for k, c in enumerate(kept) for _ in members[c]], np.int64)
    val, rule = _validation(run, ids, image_labels)
    train_classes = np.unique(image_labels[~val])
    if train_classes.size < 2:
        raise ValueError(f"{run / 'clusters.parquet'}: {train_classes.size} training clusters of >= "
                         f"{cfg.min_cluster_size} images; need at least 2 classes")

    model = attention_model(cfg)
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    t0 = time.perf_counter()
    per_image = conv_maps(model, [uri[i] for i in ids], model.spec.scales, model.spec.max_size)
    train = np.flatnonzero(~val)
    maps = [m for i in train for m in per_image[i]]
    relabel = {int(c): k for k, c in enumerate(train_classes)}  # training classes 0..K-1
    labels = np.repeat([relabel[int(image_labels[i])] for i in train], [len(per_image[i]) for i in train])
    maps_s = time.perf_counter() - t0
    validate = None
    if val.any():
        sv = selfval_set(image_labels, val)
        validate = lambda: self_map(_image_descriptors(model.pool, per_image, model.multiscale_power), sv)  # noqa: E731
    t0 = time.perf_counter()
    stats = fit_attention(model.pool, maps, labels, cfg, validate)
    for p in model.backbone.parameters():
        p.requires_grad_(True)
    facts = {"classes": int(train_classes.size), "images": int(train.size), "validation_images": int(val.sum()),
             "stopping": rule, "maps": len(maps), "maps_s": round(maps_s, 2),
             "fit_s": round(time.perf_counter() - t0, 2), "config": asdict(cfg),
             **{k: v for k, v in stats.items() if k != "history"}}
    out = save_checkpoint(model, cfg.out, extra={"attention_training": facts})
    return {**facts, "checkpoint": str(out)}
