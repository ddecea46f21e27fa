"""The training loop: one epoch = re-mine negatives with the current model, train, validate.

`train_loop_per_worker(config)` is what every Ray Train worker runs (DDP over gloo on CPU,
NCCL on GPU). The pieces it is made of (`TupleNet`, `train_epoch`, `embed_indices`,
`validate`) also run without Ray in a single process (`world=1`), which is how the benchmark
times a plain PyTorch loop on the same data.

Per epoch, on every rank:
1. `plan_epoch` (`raytrieval.mining.tuples`, the mine stage's builder): the same queries,
   positives and negative pool on every rank (seeded).
2. the images the epoch needs are embedded with the current model, each rank a shard, and the
   descriptors all-gathered (`torch.distributed.all_gather`).
3. `build_tuples`: hardest negatives, at most one per cluster, outside the query's cluster.
4. the tuples are dealt to the ranks; DDP averages the gradients.
5. self-validation: `self_map` (`raytrieval.evaluation.selfval`) on the held-out clusters of
   `split.parquet`, the whole collection embedded in shards; a benchmark (`val_dataset`) is
   scored too when given (a file in both, like the demo's database, is embedded once);
   checkpoint on rank 0, and `ray.train.report(metrics, checkpoint)` on all ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from raytrieval.retrieval.extract import default_batch_size
from raytrieval.retrieval.model import RetrievalNet, spec_from_meta
from raytrieval.retrieval.pooling import l2n
from raytrieval.trainers.config import TrainConfig
from raytrieval.mining.tuples import build_tuples, plan_epoch
from raytrieval.trainers.data import ImageStore, TrainingSet, load_selfval, load_training_set, shard_batches
from raytrieval.trainers.losses import tuple_loss

TRAIN_STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"


# ------------------------------------------------------------------------------ model pieces


def set_train_mode(model: nn.Module, freeze_bn: bool = True) -> nn.Module:
    """Train mode, with every BatchNorm layer in eval mode when `freeze_bn` (cirtorch)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return model


class TupleNet(nn.Module):
    """Embeds a list of images of any sizes in one call (one DDP forward per step).

    Images of the same shape are batched together; with frozen BatchNorm that gives exactly
    the descriptors of one-by-one forwards (up to float summation order). Under autocast the
    backbone runs in float16 and the head (pooling, whitening) in float32.

    Args:
        model: the retrieval network.
    """

    def __init__(self, model: RetrievalNet):
        super().__init__()
        self.model = model

    def forward(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """(3, H_i, W_i) images in [0, 1] -> (N, D) L2-normalised descriptors."""
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, img in enumerate(images):
            groups[tuple(img.shape)].append(i)
        parts, order = [], []
        for idx in groups.values():
            x = torch.stack([images[i] for i in idx])
            features = self.model.forward_features(self.model.normalize(x))
            # pooling and whitening in float32 even under autocast: GeM's x^p underflows in fp16
            with torch.autocast(features.device.type, enabled=False):
                parts.append(l2n(self.model.head(features.float())))
            order.extend(idx)
        out = torch.cat(parts)
        inverse = torch.empty(len(order), dtype=torch.long, device=out.device)
        inverse[torch.tensor(order, device=out.device)] = torch.arange(len(order), device=out.device)
        return out[inverse]


def build_optimizer(model: RetrievalNet, cfg: TrainConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """Adam with GeM's p in its own group (own lr, no weight decay) and exponential decay."""
    p_params = [p for n, p in model.named_parameters() if n.startswith("pool.") and p.requires_grad]
    p_ids = {id(p) for p in p_params}
    rest = [p for p in model.parameters() if id(p) not in p_ids and p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": rest, "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if p_params:
        groups.append({"params": p_params, "lr": cfg.gem_p_lr, "weight_decay": 0.0})
    optimizer = torch.optim.Adam(groups)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=cfg.lr_decay)
    return optimizer, scheduler


def new_model(cfg: TrainConfig) -> RetrievalNet:
    """The model a run starts from: `init_checkpoint` or a fresh `cfg.model_spec()`."""
    torch.manual_seed(cfg.seed)
    if cfg.init_checkpoint:
        from raytrieval.retrieval.source import load_model

        model = load_model(cfg.init_checkpoint)
        model.spec.max_size = cfg.max_size
        return model
    return RetrievalNet(cfg.model_spec())


# ------------------------------------------------------------------------------ distributed helpers


def all_gather_rows(local: np.ndarray, n: int, rank: int, world: int, device: torch.device) -> np.ndarray:
    """Reassemble rows dealt round-robin (row i on rank i % world) into an (n, D) array."""
    if world == 1:
        return local
    per_rank = -(-n // world)
    buf = torch.zeros((per_rank, local.shape[1]), dtype=torch.float32, device=device)
    buf[: local.shape[0]] = torch.from_numpy(local).to(device)
    gathered = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(gathered, buf)
    out = np.empty((n, local.shape[1]), np.float32)
    for r, g in enumerate(gathered):
        count = len(range(r, n, world))
        out[r::world] = g[:count].cpu().numpy()
    return out


def _reduce(values: Sequence[float], op: str, world: int, device: torch.device) -> list[float]:
    if world == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t.cpu().tolist()


@torch.no_grad()
def embed_indices(
    model: RetrievalNet,
    store: ImageStore,
    indices: np.ndarray,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
    batch_size: int | None = None,
    prewhiten: bool = False,
) -> np.ndarray:
    """Descriptors (len(indices), D) of store images, each rank embedding every world-th one.

    Args:
        model: the network (put in eval mode here; the caller restores train mode).
        store: the images.
        indices: which store images.
        rank: this rank.
        world: number of ranks; the result is all-gathered so every rank gets all rows.
        device: where the model is.
        batch_size: images per forward (same shape only); None: `default_batch_size`.
        prewhiten: the L2-normalised pooled vector before the whitening layer.
    """
    device = device or next(model.parameters()).device
    batch_size = batch_size or default_batch_size(device)
    model.eval()
    mine = np.asarray(indices, np.int64)[rank::world]
    dim = model.pool_dim if prewhiten else model.dim
    local = np.zeros((mine.size, dim), np.float32)
    groups: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = defaultdict(list)

    def flush(group: list[tuple[int, torch.Tensor]]) -> None:
        x = model.normalize(torch.stack([t for _, t in group]).to(device))
        f = model.forward_features(x)
        v = l2n(model.pool(f)) if prewhiten else l2n(model.head(f))
        local[[r for r, _ in group]] = v.float().cpu().numpy()

    for row, i in enumerate(mine):
        img = store.get(int(i))
        group = groups[tuple(img.shape)]
        group.append((row, img))
        if len(group) == batch_size:
            flush(group)
            group.clear()
    for group in groups.values():
        if group:
            flush(group)
    return all_gather_rows(local, len(indices), rank, world, device)


# ------------------------------------------------------------------------------ one epoch


FaultHook = Callable[[int, int], None]


def train_epoch(
    net: nn.Module,
    model: RetrievalNet,
    store: ImageStore,
    tuples: np.ndarray,
    cfg: TrainConfig,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    rank: int = 0,
    world: int = 1,
    device: torch.device | None = None,
    scaler: torch.amp.GradScaler | None = None,
    fault: FaultHook | None = None,
) -> dict[str, float]:
    """Train on this rank's share of the tuples; returns global statistics.

    A step takes `cfg.batch_size` tuples. As in cirtorch, each tuple is forwarded (its images
    in one `net` call: the DDP-wrapped `TupleNet` under Ray, a plain one otherwise) and
    back-propagated on its own, so memory holds one tuple's graph; the gradients of the
    step's tuples add up (DDP synchronises them once, on the step's last tuple) before one
    Adam step.

    Returns:
        loss (mean per tuple), pos_dist / neg_dist (mean distances), tuples (all ranks),
        train_s (slowest rank's wall time of the steps), tuples_per_s.
    """
    device = device or next(model.parameters()).device
    set_train_mode(model, cfg.freeze_bn)
    use_amp = scaler is not None and device.type == "cuda"
    ddp = isinstance(net, nn.parallel.DistributedDataParallel)
    batches = shard_batches(tuples.shape[0], cfg.batch_size, rank, world, cfg.seed, epoch)
    loss_sum = pos_sum = neg_sum = 0.0
    count = neg_count = 0
    t0 = time.perf_counter()
    for step, rows in enumerate(batches):
        if fault is not None:
            fault(epoch, step)
        optimizer.zero_grad(set_to_none=True)
        for j, r in enumerate(rows):
            members = [int(i) for i in tuples[r] if i >= 0]
            images = [store.get(i).to(device, non_blocking=True) for i in members]
            sync = nullcontext() if (not ddp or j == len(rows) - 1) else net.no_sync()
            with sync:
                with torch.autocast("cuda", dtype=torch.float16) if use_amp else nullcontext():
                    desc = net(images)
                loss, dp, dn = tuple_loss(cfg.loss, desc.float(), cfg.margin)
                (scaler.scale(loss) if use_amp else loss).backward()
            loss_sum += float(loss.detach())
            pos_sum += float(dp.sum())
            neg_sum += float(dn.sum())
            neg_count += dn.numel()
            count += 1
        if use_amp:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
    elapsed = time.perf_counter() - t0
    loss_sum, pos_sum, neg_sum, count, neg_count = _reduce([loss_sum, pos_sum, neg_sum, count, neg_count], "sum", world, device)
    (elapsed,) = _reduce([elapsed], "max", world, device)
    return {
        "loss": loss_sum / max(count, 1),
        "pos_dist": pos_sum / max(count, 1),
        "neg_dist": neg_sum / max(neg_count, 1),
        "tuples": int(count),
        "train_s": elapsed,
        "tuples_per_s": count / elapsed if elapsed > 0 else 0.0,
    }


def mine_epoch(
    model: RetrievalNet, store: ImageStore, ts: TrainingSet, cfg: TrainConfig, epoch: int,
    rank: int = 0, world: int = 1, device: torch.device | None = None,
) -> tuple[np.ndarray, float]:
    """The epoch's tuples mined with the current model: ((T, 2 + n) rows, seconds)."""
    t0 = time.perf_counter()
    rules = cfg.tuple_rules()
    plan = plan_epoch(ts, rules, epoch)
    desc = embed_indices(model, store, plan.embed, rank, world, device)
    tuples = build_tuples(ts, rules, plan, desc, epoch)
    return tuples, time.perf_counter() - t0


def init_whitening(
    model: RetrievalNet, store: ImageStore, ts: TrainingSet, cfg: TrainConfig,
    rank: int = 0, world: int = 1, device: torch.device | None = None,
) -> None:
    """Initialise the whitening layer from the PCA whitening of (a pool of) the collection."""
    from raytrieval.retrieval.whiten import learn_pca_whitening

    if model.whiten is None:
        return
    rng = np.random.default_rng([cfg.seed, 0, 2])
    n = ts.num_images
    indices = np.sort(rng.choice(n, size=min(cfg.pool_size, n), replace=False))
    X = embed_indices(model, store, indices, rank, world, device, prewhiten=True)
    if model.dim > X.shape[0] - 1:
        raise ValueError(
            f"whiten_dim: {model.dim} needs more than {X.shape[0]} descriptors to initialise from PCA "
            f"(at most {X.shape[0] - 1}); lower whiten_dim or raise pool_size"
        )
    weight, bias = learn_pca_whitening(X, dim=model.dim, shrinkage=cfg.whiten_shrinkage).linear_params()
    with torch.no_grad():
        model.whiten.weight.copy_(torch.from_numpy(weight))
        model.whiten.bias.copy_(torch.from_numpy(bias))


# ------------------------------------------------------------------------------ validation


def load_validation(cfg: TrainConfig):
    """The validation benchmark (first `val_max_queries` queries), or None."""
    if not cfg.val_dataset:
        return None
    from raytrieval.evaluation.datasets import prepare_benchmark

    bench = prepare_benchmark(cfg.val_dataset, cfg.val_data_root)  # never rewrites a demo that is there
    k = cfg.val_max_queries
    if k is not None and k < bench.num_queries:
        bench = replace(bench, queries=bench.queries[:k], qboxes=bench.qboxes[:k], gnd=bench.gnd[:k])
    return bench


VAL_CACHE_BYTES = 1 << 30  # decoded validation images a worker keeps between epochs (the rest: decoded again)


@dataclass
class Validation:
    """What a worker embeds at every validation, each image once.

    `store` holds the distinct whole images of the collection (the self-validation database)
    and of the benchmark database: for the demo they are the same files, embedded once.
    `selfval` and `bench` are (set, its database rows in `store`, its cropped queries).
    """

    store: ImageStore
    selfval: tuple[Any, np.ndarray, ImageStore] | None
    bench: tuple[Any, np.ndarray, ImageStore] | None


def load_validations(cfg: TrainConfig) -> Validation | None:
    """Self-validation (what decides) and the benchmark (what only scores); None without both."""
    selfval, bench = load_selfval(cfg), load_validation(cfg)
    if selfval is None and bench is None:
        return None
    files: dict[str, int] = {}

    def rows(paths: Sequence[str]) -> np.ndarray:
        return np.array([files.setdefault(os.path.realpath(p), len(files)) for p in paths], np.int64)

    sv = bench_set = None
    if selfval is not None:
        paths, s = selfval
        sv = (s, rows(paths), ImageStore([paths[q] for q in s.queries], cfg.max_size, s.boxes))
    if bench is not None:
        bench_set = (bench, rows(bench.images), ImageStore(bench.queries, cfg.max_size, bench.qboxes))
    return Validation(ImageStore(list(files), cfg.max_size, cache_bytes=VAL_CACHE_BYTES), sv, bench_set)


def validate(
    model: RetrievalNet, val: Validation, rank: int = 0, world: int = 1, device: torch.device | None = None,
) -> dict[str, float]:
    """Self-mAP and the benchmark's mAP of the current model (embedded in shards, scored on every rank)."""
    from raytrieval.evaluation.selfval import self_map

    X = embed_indices(model, val.store, np.arange(len(val.store)), rank, world, device)
    out: dict[str, float] = {}
    if val.selfval is not None:
        sv, rows, queries = val.selfval
        Q = embed_indices(model, queries, np.arange(len(queries)), rank, world, device)
        out["self_map"] = self_map(X[rows], sv)  # what chooses the epoch (benchmarks/selfval.md)
        out["self_map_crop"] = self_map(X[rows], sv, Q=Q)  # what chooses re-ranking; reported here
    if val.bench is not None:
        bench, rows, queries = val.bench
        q = embed_indices(model, queries, np.arange(len(queries)), rank, world, device)
        metrics = bench.evaluate(np.argsort(-(q @ X[rows].T), axis=1, kind="stable"))
        if "ns_score" in metrics:
            out.update(val_map=float(metrics["map"]), val_ns_score=float(metrics["ns_score"]))
        else:
            out.update({f"val_map_{p}": float(metrics[p]["map"]) for p in ("easy", "medium", "hard")})
    return out


# ------------------------------------------------------------------------------ checkpoints


def write_checkpoint(
    directory: Path, model: RetrievalNet, optimizer, scheduler, scaler, epoch: int,
    history: list[dict[str, Any]], cfg: TrainConfig,
) -> Path:
    """A retrieval checkpoint (model.pt + meta.json) plus the training state and history."""
    from raytrieval.retrieval.checkpoint import save_checkpoint

    metrics = history[-1] if history else {}
    extra = {"epoch": epoch, "metrics": metrics, "train": {k: cfg.to_dict()[k] for k in ("loss", "margin", "pairs", "negatives", "image_size")}}
    save_checkpoint(model, directory, extra=extra)
    state = {"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    torch.save(state, directory / TRAIN_STATE_FILE)
    (directory / HISTORY_FILE).write_text(json.dumps(history, indent=2))
    return directory


def restore_checkpoint(directory: Path, model: RetrievalNet, optimizer, scheduler, scaler) -> tuple[int, list[dict[str, Any]]]:
    """Load weights and training state written by `write_checkpoint`: (epoch, history)."""
    from raytrieval.retrieval.checkpoint import MODEL_FILE

    model.load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True))
    state = torch.load(directory / TRAIN_STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    history = json.loads((directory / HISTORY_FILE).read_text())
    return int(state["epoch"]), history


def model_from_checkpoint_dir(directory: Path, max_size: int) -> RetrievalNet:
    """An untrained model with the architecture recorded in a checkpoint's meta.json."""
    from raytrieval.retrieval.checkpoint import read_meta

    spec = spec_from_meta(read_meta(directory))
    spec.max_size = max_size
    return RetrievalNet(spec)


# ------------------------------------------------------------------------------ the Ray worker


def _fault_hook(spec: dict[str, Any] | None, rank: int) -> FaultHook | None:
    """Testing aid: kill this worker process once at (epoch, step) unless the marker exists.

    `delay_s` waits before exiting (e.g. to let other ranks run ahead).
    """
    if not spec or rank != int(spec.get("rank", 0)):
        return None
    marker = Path(spec["marker"])

    def hook(epoch: int, step: int) -> None:
        if epoch == int(spec["epoch"]) and step == int(spec.get("step", 0)) and not marker.exists():
            marker.write_text(f"killed at epoch {epoch} step {step}\n")
            time.sleep(float(spec.get("delay_s", 0.0)))
            os._exit(1)

    return hook


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker: rebuild the config, resume if a checkpoint exists, train, report.

    Args:
        config: `TrainConfig.to_dict()`, plus an optional `_fault` testing hook
            ({marker, epoch, step, rank}: the worker exits once at that step).
    """
    import ray.train
    import ray.train.torch

    config = dict(config)
    fault = _fault_hook(config.pop("_fault", None), ray.train.get_context().get_world_rank())
    cfg = TrainConfig.from_dict(config)
    torch.set_num_threads(cfg.torch_threads)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()

    ts = load_training_set(cfg)
    store = ImageStore(ts.paths, cfg.image_size)
    val = load_validations(cfg)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model = model_from_checkpoint_dir(Path(d), cfg.max_size)
    else:
        model = new_model(cfg)
    model.to(device)
    optimizer, scheduler = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler("cuda") if (cfg.amp and device.type == "cuda") else None
    history: list[dict[str, Any]] = []
    start = 0
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            start, history = restore_checkpoint(Path(d), model, optimizer, scheduler, scaler)
    elif not cfg.init_checkpoint:
        init_whitening(model, store, ts, cfg, rank, world, device)

    net: nn.Module = TupleNet(model)
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None, forward_sync_buffers=False
        )

    def report(epoch: int, metrics: dict[str, Any]) -> None:
        history.append(metrics)
        tmp = Path(tempfile.mkdtemp(prefix="rt-ckpt-"))
        try:
            ckpt = None
            if rank == 0:
                write_checkpoint(tmp / "ckpt", model, optimizer, scheduler, scaler, epoch, history, cfg)
                ckpt = ray.train.Checkpoint.from_directory(str(tmp / "ckpt"))
            ray.train.report(metrics, checkpoint=ckpt, checkpoint_dir_name=f"epoch_{epoch:04d}")
            # wait until the controller has registered it: a failure from here on resumes from
            # this epoch (without the wait, a report not yet collected dies with its worker)
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def validate_all(metrics: dict[str, Any]) -> None:
        """Self-mAP (what decides) and the benchmark's mAP (what only scores), when there are."""
        if val is not None:
            t0 = time.perf_counter()
            metrics.update(validate(model, val, rank, world, device))
            metrics["val_s"] = time.perf_counter() - t0

    # the epoch of the checkpoint this worker group started from (-1: a fresh start)
    resumed_from = start if checkpoint is not None else -1
    if start == 0 and not history:
        metrics: dict[str, Any] = {"epoch": 0, "lr": cfg.lr, "resumed_from": resumed_from, **_gem_p(model)}
        validate_all(metrics)
        report(0, metrics)

    for epoch in range(start + 1, cfg.epochs + 1):
        lr = optimizer.param_groups[0]["lr"]
        tuples, mine_s = mine_epoch(model, store, ts, cfg, epoch, rank, world, device)
        stats = train_epoch(net, model, store, tuples, cfg, optimizer, epoch, rank, world, device, scaler, fault)
        scheduler.step()
        metrics = {"epoch": epoch, "lr": lr, "resumed_from": resumed_from, "mine_s": mine_s, **stats, **_gem_p(model)}
        if epoch % cfg.val_every == 0 or epoch == cfg.epochs:
            validate_all(metrics)
        report(epoch, metrics)


SELECT_METRIC = "self_map"


def best_epoch(history: list[dict[str, Any]], metric: str = SELECT_METRIC) -> int:
    """The epoch a run keeps: the highest `metric` (the earliest among equals), else the last."""
    scored = [(h[metric], -h["epoch"]) for h in history if h.get(metric) is not None and h[metric] == h[metric]]
    if not scored:
        return int(history[-1]["epoch"])
    return -max(scored)[1]


def _gem_p(model: RetrievalNet) -> dict[str, float]:
    p = getattr(model.pool, "p", None)
    return {"gem_p": float(p.detach())} if isinstance(p, torch.Tensor) else {}

