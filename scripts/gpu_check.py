"""GPU paths, one line per check: GPU faiss, GPU embedding, a CUDA Train epoch (AMP, NCCL), a GPU Tune trial.

Run through `bash scripts/gpu_check.sh` on a machine with an NVIDIA GPU and the project's
environment with faiss-gpu (`pip install -e '.[gpu]'` in place of faiss-cpu). Without a CUDA
device it prints why and exits 0; a failed check exits 1. Sized to finish in a few minutes.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # trainset: the tiny synthetic training collection


def check_faiss() -> str:
    from raytrieval.retrieval.knn import gpu_available, search

    if not gpu_available():
        raise RuntimeError("faiss sees no GPU: install faiss-gpu (pip install 'raytrieval[gpu]')")
    rng = np.random.default_rng(0)
    db = rng.standard_normal((20000, 128)).astype(np.float32)
    q = rng.standard_normal((100, 128)).astype(np.float32)
    _, gpu_ids = search(db, q, 10, use_gpu=True)
    _, cpu_ids = search(db, q, 10, use_gpu=False)
    agree = float(np.mean(gpu_ids == cpu_ids))
    if agree < 0.99:
        raise RuntimeError(f"GPU and CPU flat search agree on {agree:.3f} of the top 10")
    return f"flat 20k x 128 on GPU equals CPU on {agree:.3f} of the top-10 ids"


def check_embedding() -> str:
    import torch

    from raytrieval.retrieval.extract import embed_batch
    from raytrieval.retrieval.model import ModelSpec, RetrievalNet

    model = RetrievalNet(ModelSpec()).eval()
    x = torch.rand(4, 3, 256, 256)
    with torch.no_grad():
        cpu = embed_batch(model, x).numpy()
        gpu = embed_batch(model.cuda(), x.cuda()).cpu().numpy()
    err = float(np.abs(cpu - gpu).max())
    if err > 1e-3:
        raise RuntimeError(f"GPU descriptors differ from CPU by {err:.2e}")
    return f"efficientnet_lite0 GeM on {torch.cuda.get_device_name(0)}: max |GPU - CPU| {err:.1e}"


def train_config(root: Path, name: str):
    from trainset import make_collection

    from raytrieval.trainers.config import TrainConfig

    paths = make_collection(root / "collection", scenes=6, views=4, size=96)
    return TrainConfig.from_dict({
        "manifest": str(paths["manifest"]), "clusters": str(paths["clusters"]), "split": str(paths["split"]),
        "epochs": 1, "num_queries": 12, "pool_size": 16, "num_negatives": 2, "image_size": 96, "max_size": 96,
        "batch_size": 4, "workers": 1, "use_gpu": True, "amp": True, "out": str(root / "train"), "name": name,
        "tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "registered_model": None,
    })


def check_train(root: Path) -> str:
    from raytrieval.trainers.fit import fit

    result = fit(train_config(root, "gpu-check"))
    last = result.history[-1]
    return f"1 epoch on 1 GPU worker (NCCL, float16 autocast): loss {last.get('loss', float('nan')):.4f}"


def check_tune(root: Path) -> str:
    from raytrieval.trainers.sweep import run_sweep
    from raytrieval.trainers.sweep_config import TRIAL_FIELDS, SweepConfig

    base = {k: v for k, v in train_config(root, "base").to_dict().items() if k not in (*TRIAL_FIELDS, "lr")}
    cfg = SweepConfig(out=str(root / "tune"), name="gpu-check", tracking_uri=f"sqlite:///{root / 'mlflow.db'}",
                      search_space={"lr": [1e-5]}, num_samples=1, train=base)
    result = run_sweep(cfg)
    if result.best is None:
        raise RuntimeError("the GPU trial reported no metric")
    return f"1 trial, {cfg.metric} {result.best['best']:.3f}"


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: skipped: no CUDA device (torch.cuda.is_available() is False); "
              "run it on a machine with an NVIDIA GPU and faiss-gpu")
        return 0
    from raytrieval.cluster.runtime import init_ray

    init_ray()
    failed = 0
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        checks: list[tuple[str, Callable[[], str]]] = [
            ("faiss", check_faiss), ("embedding", check_embedding),
            ("train", lambda: check_train(Path(tmp))), ("tune", lambda: check_tune(Path(tmp))),
        ]
        for name, check in checks:
            t = time.perf_counter()
            try:
                line = f"ok   {name:<10} {check()} ({time.perf_counter() - t:.0f} s)"
            except Exception as exc:  # noqa: BLE001 - report every check, then fail
                failed += 1
                line = f"FAIL {name:<10} {type(exc).__name__}: {exc}"
            print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
