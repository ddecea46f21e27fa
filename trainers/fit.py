"""Build and run the Ray Train `TorchTrainer` of a fine-tuning run, tracked in MLflow.

Layout of a run (`<out>/<name>/`, the Ray Train storage of the run):

    epoch_0000/ ... epoch_NNNN/   checkpoints reported by the workers (model.pt, meta.json,
                                  train_state.pt, history.json); epoch 0 is the initial model
    final/                        the last checkpoint as a plain retrieval checkpoint
    plots/curves.png              loss and validation mAP per epoch
    mlflow_run.json               the MLflow run of this training
    result.json                   history, final checkpoint, MLflow run and model version

Re-running the same `out`/`name` resumes from the last checkpoint (Ray Train finds it in the
storage path) and continues the same MLflow run; a worker failure during the run restarts
the worker group from the last checkpoint (`max_failures`). The workers wait after each report
until the Train controller has committed the checkpoint (it collects reports when it polls
the workers, every 2 s by default), so a failure loses at most the epoch in progress, which
is then trained again with the same tuples (sampling is seeded by epoch). Each epoch appears
once in the history and in MLflow.
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from raytrieval.trainers.config import TrainConfig

FINAL_DIR = "final"
RESULT_FILE = "result.json"


@dataclass
class TrainResult:
    """What a finished training produced.

    Args:
        checkpoint: the final retrieval checkpoint (`<run dir>/final`).
        history: per-epoch metrics (epoch 0: the initial model).
        run_id: the MLflow run.
        model_version: the registered model version (None if not registered).
        ray_path: the Ray Train run directory.
    """

    checkpoint: Path
    history: list[dict[str, Any]]
    run_id: str
    model_version: int | None
    ray_path: str


def build_trainer(cfg: TrainConfig, callbacks: list | None = None, fault: dict[str, Any] | None = None):
    """The `TorchTrainer` of a run (DDP: gloo on CPU, NCCL on GPU).

    Args:
        cfg: the run configuration.
        callbacks: Ray Train `UserCallback`s (MLflow logging).
        fault: testing aid passed to the workers (see `raytrieval.trainers.loop._fault_hook`).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raytrieval.trainers.loop import train_loop_per_worker

    class Trainer(TorchTrainer):
        """A `TorchTrainer` that leaves SIGINT alone (see `run_fit`) and keeps its controller."""

        controller = None

        def _register_sigint_handler(self, controller) -> None:  # Ray 2.60 Train V2's hook
            self.controller = controller

    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    loop_config = cfg.to_dict()
    if fault:
        loop_config["_fault"] = dict(fault)
    return Trainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=str(cfg.run_dir.parent),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            callbacks=list(callbacks or []),
        ),
    )


def epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    """One console line for a reported epoch: loss, validation metrics, seconds."""
    parts = [f"[train] epoch {int(metrics.get('epoch', 0))}/{epochs}"]
    if isinstance(metrics.get("loss"), (int, float)):
        parts.append(f"loss {metrics['loss']:.4f}")
    if isinstance(metrics.get("self_map"), (int, float)):
        parts.append(f"self-mAP {100 * metrics['self_map']:.1f}")
    for key in sorted(metrics):
        value = metrics[key]
        if not key.startswith("val_") or key == "val_s" or not isinstance(value, (int, float)) or value != value:
            continue
        if key.startswith("val_map"):
            parts.append(f"{key.replace('val_map', 'val mAP').replace('_', ' ')} {100 * value:.1f}")
        else:
            parts.append(f"{key.replace('_', ' ')} {value:.3f}")
    seconds = sum(float(metrics.get(k) or 0.0) for k in ("mine_s", "train_s", "val_s"))
    parts.append(f"{seconds:.0f} s")
    return ", ".join(parts)


class EpochPrinter(threading.Thread):
    """Prints `epoch_line` for each epoch checkpoint that appears in a run directory.

    A driver thread that reads the checkpoints' `history.json` twice a second, so the console
    needs no worker output; epochs already there when it starts (a resumed run) are skipped.
    `stop()` prints what is left and ends it.
    """

    def __init__(self, run_dir: Path, epochs: int, echo: Callable[[str], None] = print):
        super().__init__(name="epoch-printer", daemon=True)
        self.run_dir, self.epochs, self.echo = run_dir, epochs, echo
        self.done = {p.name for p in run_dir.glob("epoch_*")}
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            self.print_new()

    def stop(self) -> None:
        self.stopped.set()
        self.join()
        self.print_new()

    def print_new(self) -> None:
        for ckpt in sorted(self.run_dir.glob("epoch_*")):
            if ckpt.name in self.done:
                continue
            try:
                history = json.loads((ckpt / "history.json").read_text())
            except (OSError, ValueError):  # not fully written yet: next time
                continue
            self.done.add(ckpt.name)
            if history:
                self.echo(epoch_line(history[-1], self.epochs))


def run_fit(trainer) -> Any:
    """`trainer.fit()` (a trainer from `build_trainer`), interruptible by Ctrl-C.

    Ray Train's own `fit` installs a SIGINT handler in the main thread and leaves it in place
    after fitting: a later Ctrl-C (say while serving) only printed "Gracefully aborting the
    training run" (../shared/STACK.md, "Signals"). The trainer of `build_trainer` installs none,
    and the handler in place before is restored in any case; so Ctrl-C during fitting raises
    `KeyboardInterrupt` here, which stops the run (controller and workers) and is re-raised.
    """
    import ray

    previous = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    except KeyboardInterrupt:
        if getattr(trainer, "controller", None) is not None:
            ray.kill(trainer.controller)  # at once: the workers go with it, a rerun resumes
        raise
    finally:
        if signal.getsignal(signal.SIGINT) is not previous:
            signal.signal(signal.SIGINT, previous)


def chosen_checkpoint(last: str | Path, history: list[dict[str, Any]]) -> Path:
    """The checkpoint of the best epoch by self-mAP (`raytrieval.trainers.loop.best_epoch`),
    a sibling `epoch_NNNN` of the last one; the last one without self-validation."""
    from raytrieval.trainers.loop import best_epoch

    best = Path(last).parent / f"epoch_{best_epoch(history):04d}"
    return best if (best / "model.pt").is_file() else Path(last)


def export_final(ray_checkpoint_dir: str | Path, run_dir: Path, history: list[dict[str, Any]] | None = None) -> Path:
    """Copy a reported checkpoint to `<run dir>/final` (atomically), with the run's whole
    `history` when given (a best epoch's own history stops at that epoch)."""
    from raytrieval.retrieval.artifacts import atomic_dir

    target = run_dir / FINAL_DIR
    with atomic_dir(target) as tmp:
        for item in Path(ray_checkpoint_dir).iterdir():
            if item.is_file():
                shutil.copy2(item, tmp / item.name)
        if history is not None:
            (tmp / "history.json").write_text(json.dumps(history, indent=2))
    return target


def fit(cfg: TrainConfig, fault: dict[str, Any] | None = None, track: bool = True) -> TrainResult:
    """Train (or resume) a run on the connected Ray cluster and track it in MLflow.

    Ray must be initialised by the caller (`raytrieval.cluster.runtime.init_ray`, which keeps Ray
    offline); this package does not start Ray itself.

    Args:
        cfg: the run configuration.
        fault: testing aid (see `build_trainer`).
        track: log to MLflow and register the model.

    Returns:
        The `TrainResult`; also written to `<run dir>/result.json`.

    Raises:
        RuntimeError: Ray is not initialised, or the run reported no checkpoint.
        ray.train.TrainingFailedError: the workers failed more than `max_failures` times.
    """
    import ray

    from raytrieval.retrieval.artifacts import atomic_write_json
    from raytrieval.trainers import tracking

    if not ray.is_initialized():
        raise RuntimeError("Ray is not initialised: call raytrieval.cluster.runtime.init_ray() before raytrieval.trainers.fit.fit()")
    cfg = cfg.resolved()
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cfg.run_dir / "config.json", cfg.to_dict())
    run = tracking.start_run(cfg) if track else None
    callbacks = [tracking.MlflowEpochLogger(run.tracking_uri, run.run_id)] if run else []
    try:
        printer = EpochPrinter(cfg.run_dir, cfg.epochs)
        printer.start()
        try:
            result = run_fit(build_trainer(cfg, callbacks, fault))
        finally:
            printer.stop()
        if result.checkpoint is None:
            raise RuntimeError(f"training {cfg.name}: no checkpoint was reported")
        history = json.loads((Path(result.checkpoint.path) / "history.json").read_text())
        final = export_final(chosen_checkpoint(result.checkpoint.path, history), cfg.run_dir, history)
        registered = tracking.finish_run(run, cfg, final, history) if run else {"version": None}
    except BaseException:
        if run:
            tracking.fail_run(run)
        raise
    out = TrainResult(
        checkpoint=final,
        history=history,
        run_id=run.run_id if run else "",
        model_version=registered.get("version"),
        ray_path=str(result.path),
    )
    atomic_write_json(cfg.run_dir / RESULT_FILE, {
        "checkpoint": str(final), "history": history, "run_id": out.run_id,
        "model_version": out.model_version, "ray_path": out.ray_path,
        "tracking_uri": cfg.resolved_tracking_uri if run else None,
    })
    return out
