"""Skippable pipeline stages: a stage whose outputs exist with the same fingerprint is not re-run.

A stage's fingerprint covers its resolved config and the content of its inputs; its record
(`<run dir>/stages/<name>.json`) is written only after the stage succeeded, so an interrupted
pipeline re-runs exactly the stages that did not finish.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from raytrieval.retrieval.artifacts import atomic_write_json, fingerprint, sha1_file


def content_hash(path: Path) -> str:
    """sha1 of a file, or of a directory's files (names and contents); 'missing' if absent."""
    if path.is_file():
        return sha1_file(path)
    if path.is_dir():
        return fingerprint(sorted((str(p.relative_to(path)), sha1_file(p)) for p in path.rglob("*") if p.is_file()))
    return "missing"


@dataclass
class Stage:
    """A unit of the pipeline.

    Args:
        name: stage name (also its record file name).
        config: the resolved, JSON-serialisable config of the stage.
        inputs: files or directories whose content the stage depends on.
        outputs: files or directories the stage produces.
        run: does the work and returns a JSON-serialisable summary.
    """

    name: str
    config: dict[str, Any]
    inputs: Sequence[Path]
    outputs: Sequence[Path]
    run: Callable[[], dict[str, Any]]
    record: dict[str, Any] = field(default_factory=dict)


def stage_fingerprint(stage: Stage) -> str:
    return fingerprint(stage.name, stage.config, [content_hash(Path(p)) for p in stage.inputs])


def run_stage(stage: Stage, run_dir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run a stage unless its record matches its fingerprint and its outputs exist.

    Returns:
        The stage record: fingerprint, seconds, skipped, summary.
    """
    path = run_dir / "stages" / f"{stage.name}.json"
    fp = stage_fingerprint(stage)
    if path.is_file():
        old = json.loads(path.read_text())
        if old.get("fingerprint") == fp and all(Path(p).exists() for p in stage.outputs):
            log(f"[{stage.name}] current (fingerprint {fp}), skipped")
            return {**old, "skipped": True}
    log(f"[{stage.name}] running")
    t = time.perf_counter()
    summary = stage.run()
    record = {"fingerprint": fp, "seconds": time.perf_counter() - t, "summary": summary, "config": stage.config}
    atomic_write_json(path, record)
    log(f"[{stage.name}] done in {record['seconds']:.1f} s")
    return {**record, "skipped": False}
