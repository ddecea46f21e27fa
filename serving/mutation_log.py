"""The index mutation log: `log.jsonl`, one JSON object a line, fsynced before a mutation is acknowledged.

An entry is ``{"seq", "op": "add"|"delete", "label", "image_id", ...}``; an add also carries
``uri``, ``width``, ``height`` and its vector as base64 little-endian float32. A torn last line (a
write that was never acknowledged) is dropped when the log is read; a corrupt line before it is
an error.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from raytrieval.retrieval.artifacts import atomic_write_bytes

__all__ = ["LOG_FILE", "MutationLog", "decode_vector", "encode_vector"]

LOG_FILE = "log.jsonl"
_KEYS = {"seq", "op", "label", "image_id"}


def encode_vector(v: np.ndarray) -> str:
    """A (D,) vector as base64 of little-endian float32."""
    return base64.b64encode(np.ascontiguousarray(v, dtype="<f4").tobytes()).decode("ascii")


def decode_vector(text: str, dim: int) -> np.ndarray:
    """The (D,) float32 vector of `encode_vector`, checked against the index dimension."""
    v = np.frombuffer(base64.b64decode(text), dtype="<f4")
    if v.shape != (dim,):
        raise ValueError(f"log: vector of {v.shape[0]} values, index dimension is {dim}")
    return v.astype(np.float32)


class MutationLog:
    """Append-only, fsynced mutation log of one index directory (not thread-safe: the index locks)."""

    def __init__(self, directory: Path) -> None:
        self.path = Path(directory) / LOG_FILE
        self._fd: int | None = None

    def append(self, entries: list[dict[str, Any]]) -> None:
        """Write entries and fsync: once this returns they survive a crash."""
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o666)
        payload = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in entries).encode("utf-8")
        view = memoryview(payload)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    def read(self) -> list[dict[str, Any]]:
        """All entries; a torn final line is dropped and cut from the file (which then ends at a newline).

        Raises:
            ValueError: a corrupt line that is not the last one.
        """
        if not self.path.is_file():
            return []
        raw = self.path.read_bytes()
        keep = len(raw)
        lines = raw.split(b"\n")
        entries: list[dict[str, Any]] = []
        pos = 0
        for i, line in enumerate(lines):
            if line.strip():
                try:
                    entry = json.loads(line)
                    if not isinstance(entry, dict) or not _KEYS <= entry.keys():
                        raise ValueError("not a log entry")
                except ValueError as exc:
                    if i == len(lines) - 1:  # torn final write: never acknowledged, drop it
                        keep = pos
                        break
                    raise ValueError(f"log: {self.path} line {i + 1} is corrupt ({exc})") from None
                entries.append(entry)
            pos += len(line) + 1
        if keep < len(raw) or (keep and raw[keep - 1 : keep] != b"\n"):
            with open(self.path, "r+b") as f:  # leave a file that ends at a line boundary
                f.truncate(keep)
                if keep and raw[keep - 1 : keep] != b"\n":
                    f.seek(keep)
                    f.write(b"\n")
                f.flush()
                os.fsync(f.fileno())
        return entries

    def reset(self) -> None:
        """Empty the log (after a snapshot has committed everything in it)."""
        self.close()
        atomic_write_bytes(self.path, b"")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:  # best effort; every append is fsynced anyway
        try:
            self.close()
        except OSError:
            pass
