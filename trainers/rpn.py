"""Training the region proposal head on the clean stage's boxes (Gordo et al. 2016), no labels.

Targets are the inlier-keypoint boxes of `clusters.parquet` (one per clustered image, pixels of
the stored image). The retrieval backbone is frozen, so its maps of the training images are
computed once and the `raytrieval.retrieval.rpn.ProposalNet` head is trained on them.

- `train_rpn`: the pure in-process training (one process, or one shard of a DDP run).
- `rpn_loop_per_worker` + `fit_rpn`: the same through a Ray Train `TorchTrainer` (gloo on CPU,
  a GPU per worker when asked), reporting a checkpoint per epoch; a re-run of the same
  `out`/`name` resumes from the last one. The final head is copied to `<out>/<name>/final`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from raytrieval.retrieval.rpn import ProposalNet, save_proposal_net, square_features, to_square


@dataclass
class RpnConfig:
    """Configuration of a proposal-head training.

    Args:
        manifest: `images.parquet` (image_id -> uri, width, height).
        clusters: `clusters.parquet` of the clean stage; rows with a box are the training set.
        model: retrieval checkpoint directory whose backbone is used; None: `backbone`/`weights`.
        backbone: backbone registry name (without `model`).
        weights: backbone weights (without `model`): "imagenet", a file, or None.
        image_size: side of the square images.
        epochs: passes over the training boxes.
        batch_size: images per step and worker.
        lr: Adam learning rate.
        proposals: proposals kept per image at inference.
        seed: seed of the initialisation and the batch order.
        workers: Ray Train workers (`fit_rpn`).
        cpus_per_worker: CPUs per worker.
        use_gpu: a GPU per worker.
        torch_threads: torch threads inside a worker.
        out: parent of the run directory `<out>/<name>`.
        name: the run's name.
    """

    manifest: str
    clusters: str
    model: str | None = None
    backbone: str = "efficientnet_lite0"
    weights: str | None = "imagenet"
    image_size: int = 512
    epochs: int = 10
    batch_size: int = 4
    lr: float = 1e-3
    proposals: int = 50
    seed: int = 0
    workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    torch_threads: int = 1
    out: str = "runs/rpn"
    name: str = "rpn"

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "workers", "torch_threads", "proposals"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.image_size < 32:
            raise ValueError(f"image_size: must be >= 32, got {self.image_size}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if self.cpus_per_worker <= 0:
            raise ValueError(f"cpus_per_worker: must be > 0, got {self.cpus_per_worker}")

    @property
    def run_dir(self) -> Path:
        return Path(self.out).resolve() / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def backbone_model(cfg: RpnConfig):
    """The frozen retrieval model whose backbone the head sits on."""
    from raytrieval.retrieval.source import load_model

    source = cfg.model or {"backbone": cfg.backbone, "weights": cfg.weights}
    model = load_model(source)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def box_targets(cfg: RpnConfig) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(ids, uris, (N, 4) boxes in pixels, (N, 2) image (width, height)) of the boxed clustered images."""
    from raytrieval.mining.cleaning import read_clusters
    from raytrieval.retrieval.manifest import ok_images, read_manifest

    manifest = ok_images(read_manifest(cfg.manifest))
    rows = {i: k for k, i in enumerate(manifest.column("image_id").to_pylist())}
    uris = manifest.column("uri").to_pylist()
    widths = manifest.column("width").to_pylist()
    heights = manifest.column("height").to_pylist()
    ids, paths, boxes, sizes = [], [], [], []
    clusters = read_clusters(cfg.clusters)
    for image_id, box in zip(clusters.column("image_id").to_pylist(), clusters.column("box").to_pylist()):
        if box is None or image_id not in rows:
            continue
        k = rows[image_id]
        ids.append(image_id)
        paths.append(uris[k])
        boxes.append(box)
        sizes.append((widths[k], heights[k]))
    if not ids:
        raise ValueError(f"clusters: no clustered image of {cfg.manifest} has a box in {cfg.clusters}")
    return ids, paths, np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(sizes, np.float32).reshape(-1, 2)


def new_head(cfg: RpnConfig, in_channels: int) -> ProposalNet:
    torch.manual_seed(cfg.seed)
    return ProposalNet(in_channels, image_size=cfg.image_size, proposals=cfg.proposals)


def train_rpn(
    cfg: RpnConfig,
    rank: int = 0,
    world: int = 1,
    wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    on_epoch: Callable[[int, ProposalNet, dict[str, float]], None] | None = None,
    head: ProposalNet | None = None,
    start_epoch: int = 0,
    device: torch.device | None = None,
) -> ProposalNet:
    """Train the proposal head in this process (one shard of the boxes when `world` > 1).

    Args:
        cfg: the configuration.
        rank, world: this worker's shard of the training boxes (every `world`-th from `rank`).
        wrap: applied to the head before training (DDP inside a Ray Train worker).
        on_epoch: called after each epoch with (epoch, head, {'loss': mean loss}).
        head: a head to continue (resume); None: a new one.
        start_epoch: epochs already done.
        device: where to train (default: CPU).

    Returns:
        The trained head (unwrapped), in eval mode.
    """
    device = device or torch.device("cpu")
    model = backbone_model(cfg).to(device)
    _, paths, boxes, sizes = box_targets(cfg)
    shard = np.arange(rank, len(paths), world)
    if shard.size == 0:
        shard = np.arange(len(paths))[:1]  # more workers than boxes: reuse one
    feats = torch.cat([square_features(model, [paths[i] for i in shard[s : s + 8]], cfg.image_size)[0]
                       for s in range(0, shard.size, 8)])  # (n, C, h, w), the frozen backbone's maps
    targets = torch.from_numpy(to_square(boxes[shard], sizes[shard], cfg.image_size)).to(device)
    head = head or new_head(cfg, feats.shape[1])
    head.to(device).train()
    net = wrap(head)
    optimizer = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=cfg.lr)
    # the same number of steps on every worker (DDP), whatever its shard's size
    steps = math.ceil(len(paths) / world / cfg.batch_size)
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        order = np.random.default_rng([cfg.seed, epoch, rank]).permutation(len(feats))
        losses = []
        for step in range(steps):
            idx = torch.from_numpy(order[(step * cfg.batch_size + np.arange(cfg.batch_size)) % len(order)])
            parts = net(feats[idx], targets[idx])
            loss = parts["loss_objectness"] + parts["loss_rpn_box_reg"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        if on_epoch is not None:
            on_epoch(epoch, head, {"epoch": epoch, "loss": float(np.mean(losses))})
    return head.eval()


def rpn_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker: resume from the last checkpoint if any, train, report each epoch."""
    import tempfile

    import ray.train
    import ray.train.torch

    from raytrieval.retrieval.rpn import load_proposal_net

    cfg = RpnConfig(**config)
    torch.set_num_threads(cfg.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    head, start = None, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            head = load_proposal_net(d)
            start = int(json.loads((Path(d) / "rpn.json").read_text())["epoch"])

    def wrap(module: nn.Module) -> nn.Module:
        return ray.train.torch.prepare_model(module, move_to_device=False) if world > 1 else module

    def report(epoch: int, head: ProposalNet, metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            if rank == 0:
                save_proposal_net(head, tmp, {"epoch": epoch, "loss": metrics["loss"]})
                ckpt = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch:04d}")

    train_rpn(cfg, rank, world, wrap, report, head, start, ray.train.torch.get_device())


def fit_rpn(cfg: RpnConfig) -> Path:
    """Train (or resume) the head through a Ray Train `TorchTrainer` on the connected Ray.

    Ray must be initialised by the caller (`raytrieval.cluster.runtime.init_ray`).

    Returns:
        `<out>/<name>/final`, the last epoch's head (`raytrieval.retrieval.rpn.load_proposal_net`).
    """
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raytrieval.trainers.fit import export_final, run_fit

    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call raytrieval.cluster.runtime.init_ray() first")
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    trainer = TorchTrainer(
        rpn_loop_per_worker,
        train_loop_config=cfg.to_dict(),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(name=cfg.name, storage_path=str(cfg.run_dir.parent),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    result = run_fit(trainer)
    if result.checkpoint is None:
        raise RuntimeError(f"rpn {cfg.name}: no checkpoint was reported")
    return export_final(result.checkpoint.path, cfg.run_dir)
