"""Checkpoints: a directory with `model.pt` (state dict) and `meta.json` (preprocessing)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from raytrieval.retrieval.model import RetrievalNet, spec_from_meta

MODEL_FILE = "model.pt"
META_FILE = "meta.json"


def save_checkpoint(model: RetrievalNet, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the model atomically: a temp directory renamed over `directory`.

    Args:
        model: the network (any DDP wrapper must be removed by the caller).
        directory: target checkpoint directory (replaced if it exists).
        extra: JSON-serialisable facts added to the meta (epoch, metrics, ...).

    Returns:
        The checkpoint directory.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, tmp / MODEL_FILE)
        meta = {**model.meta, **(extra or {})}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's meta.json."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no {META_FILE} in {directory}")
    return json.loads(path.read_text())


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> RetrievalNet:
    """Rebuild the model from meta.json and load its weights with `weights_only=True`."""
    meta = read_meta(directory)
    model = RetrievalNet(spec_from_meta(meta))
    state = torch.load(Path(directory) / MODEL_FILE, map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model.eval()
