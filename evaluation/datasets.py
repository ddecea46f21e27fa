"""Benchmark loaders: Revisited Oxford/Paris layout and grouped (UKBench-style) collections.

Revisitop layout::

    <root>/<name>/jpg/<imname>.jpg
    <root>/<name>/gnd_<name>.json   (preferred: plain data, nothing to unpickle)
    <root>/<name>/gnd_<name>.pkl    (read with a restricted unpickler, never plain pickle)

The ground truth holds ``imlist`` (database image names), ``qimlist`` (query image names) and
``gnd[i] = {bbx, easy, hard, junk}`` with indices into ``imlist`` and ``bbx = [x0, y0, x1, y1]``
in pixels of the stored query image.

Grouped layout (UKBench)::

    <folder>/jpg/*.jpg   sorted; images k*G .. k*G+G-1 show the same object (G = group size)
"""

from __future__ import annotations

import _codecs
import builtins
import importlib
import json
import math
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from raytrieval.evaluation.metrics import evaluate_classic, evaluate_revisitop, ns_score

__all__ = [
    "RestrictedUnpickler",
    "safe_load_pickle",
    "load_gnd",
    "Benchmark",
    "load_revisitop",
    "load_grouped",
    "load_benchmark",
]

Box = tuple[float, float, float, float]

# Builtins a data pickle may name (older protocols build sets etc. through REDUCE). No
# callables that reach attributes, import modules or evaluate code (getattr, eval, exec, ...).
_SAFE_BUILTINS = frozenset({
    "set", "frozenset", "list", "dict", "tuple", "int", "float", "complex", "str", "bytes",
    "bytearray", "bool",
})

# numpy globals that an ndarray / dtype / scalar pickle needs, and nothing else.
_NUMPY_MULTIARRAY_NAMES = frozenset({"_reconstruct", "scalar"})
_NUMPY_MULTIARRAY_MODULES = frozenset({"numpy.core.multiarray", "numpy._core.multiarray"})
_NUMPY_TOP_NAMES = frozenset({"ndarray", "dtype"})


def _numpy_multiarray() -> Any:
    try:
        return importlib.import_module("numpy._core.multiarray")  # numpy >= 2
    except ImportError:
        return importlib.import_module("numpy.core.multiarray")  # numpy 1.x


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` limited to latin-1, the only use protocol-2 pickles make of it."""
    if not isinstance(obj, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(
            f"refused global _codecs.encode with encoding {encoding!r}: only latin1 is allowed")
    return _codecs.encode(obj, "latin1", errors)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a revisitop ground-truth pickle can need.

    Admitted: a few builtin containers, numbers and strings; for numpy arrays only
    ``numpy.core.multiarray._reconstruct`` / ``numpy._core.multiarray._reconstruct``,
    ``numpy.ndarray``, ``numpy.dtype`` and ``numpy.core.multiarray.scalar`` (and its
    ``numpy._core`` spelling); ``_codecs.encode`` limited to latin-1 (protocol 2 stores bytes
    that way). Any other global raises ``pickle.UnpicklingError`` naming it, before anything
    is called. The shared ``gnd_rparis6k-mini.pkl`` needs no global at all.
    """

    def find_class(self, module: str, name: str) -> Any:
        if module in ("builtins", "__builtin__") and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if module in _NUMPY_MULTIARRAY_MODULES and name in _NUMPY_MULTIARRAY_NAMES:
            return getattr(_numpy_multiarray(), name)
        if module == "numpy" and name in _NUMPY_TOP_NAMES:
            return getattr(np, name)
        if module == "_codecs" and name == "encode":
            return _latin1_encode
        raise pickle.UnpicklingError(
            f"refused global {module}.{name}: not allowed in a ground-truth pickle")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id: not allowed in a ground-truth pickle")


def safe_load_pickle(path: str | os.PathLike | BinaryIO) -> Any:
    """Load a data-only pickle with :class:`RestrictedUnpickler`.

    Args:
        path: file path or binary file object.

    Returns:
        The unpickled object.

    Raises:
        pickle.UnpicklingError: the pickle names a global outside the allowlist.
    """
    if hasattr(path, "read"):
        return RestrictedUnpickler(path).load()  # type: ignore[arg-type]
    with open(path, "rb") as f:
        return RestrictedUnpickler(f).load()


def _index_array(value: Any, where: str, n: int) -> np.ndarray:
    arr = np.asarray(value if value is not None else [])
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"{where} must be a 1-D list of indices, got shape {arr.shape}")
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer)
                                 or (np.issubdtype(arr.dtype, np.floating)
                                     and np.all(arr == np.round(arr)))):
        raise ValueError(f"{where} must hold integer indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    bad = arr[(arr < 0) | (arr >= n)]
    if bad.size:
        raise ValueError(f"{where} has index {int(bad[0])} outside [0, {n}) (imlist has {n} "
                         "images)")
    return arr


def _box(value: Any, where: str) -> Box | None:
    if value is None:
        return None
    try:
        box = tuple(float(v) for v in np.asarray(value, dtype=np.float64).reshape(-1))
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be [x0, y0, x1, y1] numbers, got {value!r}") from None
    if len(box) != 4 or not all(math.isfinite(v) for v in box):
        raise ValueError(f"{where} must be 4 finite numbers [x0, y0, x1, y1], got {value!r}")
    x0, y0, x1, y1 = box
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"{where} must have x1 > x0 and y1 > y0, got {list(box)}")
    return box  # type: ignore[return-value]


def _name_list(value: Any, where: str) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        raise ValueError(f"{where} must be a list of image names, got {type(value).__name__}")
    names = list(value)
    if not all(isinstance(v, (str, np.str_)) for v in names):
        raise ValueError(f"{where} must hold only strings")
    return [str(v) for v in names]


def load_gnd(path: str | os.PathLike) -> dict:
    """Read and validate a revisitop ground-truth file (``.json`` or ``.pkl``).

    Args:
        path: ``gnd_<name>.json`` or ``gnd_<name>.pkl``; the pickle is read with
            :class:`RestrictedUnpickler`.

    Returns:
        ``{'imlist': list[str], 'qimlist': list[str], 'gnd': list[dict]}`` where each gnd
        entry has ``'bbx'`` (``(x0, y0, x1, y1)`` floats or None) and int64 arrays
        ``'easy'``, ``'hard'``, ``'junk'``. Other keys are dropped.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: unknown suffix, or a missing/malformed field (named in the message).
        pickle.UnpicklingError: the pickle names a global outside the allowlist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ground-truth file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: not valid JSON ({exc})") from None
    elif suffix == ".pkl":
        raw = safe_load_pickle(path)
    else:
        raise ValueError(f"{path}: ground truth must be .json or .pkl, got {suffix!r}")

    if not isinstance(raw, dict):
        raise ValueError(f"{path}: top level must be a dict, got {type(raw).__name__}")
    for key in ("imlist", "qimlist", "gnd"):
        if key not in raw:
            raise ValueError(f"{path}: missing key {key!r} (needs imlist, qimlist, gnd)")
    imlist = _name_list(raw["imlist"], f"{path}: imlist")
    qimlist = _name_list(raw["qimlist"], f"{path}: qimlist")
    gnd_raw = raw["gnd"]
    if not isinstance(gnd_raw, (list, tuple)):
        raise ValueError(f"{path}: gnd must be a list, got {type(gnd_raw).__name__}")
    if len(gnd_raw) != len(qimlist):
        raise ValueError(f"{path}: gnd has {len(gnd_raw)} entries but qimlist has "
                         f"{len(qimlist)} queries")
    n = len(imlist)
    gnd: list[dict] = []
    for i, g in enumerate(gnd_raw):
        where = f"{path}: gnd[{i}]"
        if not isinstance(g, dict):
            raise ValueError(f"{where} must be a dict, got {type(g).__name__}")
        for key in ("bbx", "easy", "hard", "junk"):
            if key not in g:
                raise ValueError(f"{where} missing key {key!r} (needs bbx, easy, hard, junk)")
        gnd.append({
            "bbx": _box(g["bbx"], f"{where}['bbx']"),
            "easy": _index_array(g["easy"], f"{where}['easy']", n),
            "hard": _index_array(g["hard"], f"{where}['hard']", n),
            "junk": _index_array(g["junk"], f"{where}['junk']", n),
        })
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


@dataclass
class Benchmark:
    """An evaluation benchmark: database images, queries, boxes and ground truth.

    Args:
        name: benchmark name (e.g. ``'rparis6k-mini'``).
        images: absolute paths of the database images, in ground-truth index order.
        queries: absolute paths of the query images.
        qboxes: per query ``(x0, y0, x1, y1)`` in pixels of the stored query image, or None
            for the whole image.
        gnd: per query dict of int64 database-index arrays ``'easy'``, ``'hard'``, ``'junk'``.
        groups: (Ndb,) group id of each database image for grouped sets, else None.
        protocol: ``'revisitop'`` (mAP Easy/Medium/Hard) or ``'grouped'`` (N-S score + mAP).
    """

    name: str
    images: list[str]
    queries: list[str]
    qboxes: list[Box | None]
    gnd: list[dict]
    groups: np.ndarray | None = None
    protocol: str = "revisitop"

    def __post_init__(self) -> None:
        if self.protocol not in ("revisitop", "grouped"):
            raise ValueError(f"protocol must be 'revisitop' or 'grouped', got {self.protocol!r}")
        nq = len(self.queries)
        if len(self.qboxes) != nq:
            raise ValueError(f"qboxes has {len(self.qboxes)} entries for {nq} queries")
        if len(self.gnd) != nq:
            raise ValueError(f"gnd has {len(self.gnd)} entries for {nq} queries")
        if self.groups is not None:
            self.groups = np.asarray(self.groups, dtype=np.int64)
            if self.groups.shape != (len(self.images),):
                raise ValueError(f"groups must have shape ({len(self.images)},), got "
                                 f"{self.groups.shape}")
        elif self.protocol == "grouped":
            raise ValueError("groups is required for protocol 'grouped'")

    @property
    def num_images(self) -> int:
        """Number of database images."""
        return len(self.images)

    @property
    def num_queries(self) -> int:
        """Number of queries."""
        return len(self.queries)

    def evaluate(self, ranks: np.ndarray, kappas: Sequence[int] = (1, 5, 10)) -> dict:
        """Score a ranking with this benchmark's protocol.

        Args:
            ranks: (Nq, Ndb) int array of database indices sorted by decreasing similarity.
            kappas: cut-offs for mean precision@k.

        Returns:
            revisitop: ``{'easy': {...}, 'medium': {...}, 'hard': {...}}`` (see
            :func:`raytrieval.evaluation.metrics.evaluate_revisitop`). grouped: ``{'ns_score', 'map',
            'mp@k'..., 'aps'}`` with each group (query included) as positives; the N-S score
            looks at the top group-size results.
        """
        if self.protocol == "revisitop":
            return evaluate_revisitop(ranks, self.gnd, kappas)
        gnd = [{"ok": g["easy"], "junk": g["junk"]} for g in self.gnd]
        # Queries are the database images in order, so the query groups are ``groups``.
        top = int(np.bincount(self.groups).max())
        out = {"ns_score": ns_score(ranks, self.groups, top=top)}
        out.update(evaluate_classic(ranks, gnd, kappas))
        return out


def _check_files(paths: list[str], what: str, source: Path) -> None:
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(paths)} {what} listed in {source} are "
                                f"missing, e.g. {missing[0]}")


def load_revisitop(data_root: str | os.PathLike, name: str) -> Benchmark:
    """Load a benchmark in revisitop layout.

    Reads ``<root>/<name>/gnd_<name>.json`` when present, else ``gnd_<name>.pkl`` (restricted
    unpickler); images are ``<root>/<name>/jpg/<imname>.jpg``.

    Args:
        data_root: folder holding ``<name>/``.
        name: benchmark name, e.g. ``'rparis6k-mini'``.

    Returns:
        A :class:`Benchmark` with protocol ``'revisitop'``.

    Raises:
        FileNotFoundError: no ground-truth file, or images missing (count and one example).
        ValueError: malformed ground truth.
    """
    folder = Path(os.path.abspath(os.fspath(data_root))) / name
    candidates = [folder / f"gnd_{name}.json", folder / f"gnd_{name}.pkl"]
    gnd_path = next((p for p in candidates if p.is_file()), None)
    if gnd_path is None:
        raise FileNotFoundError(f"benchmark {name!r}: no ground truth, looked for "
                                f"{candidates[0]} and {candidates[1]}")
    data = load_gnd(gnd_path)
    jpg = folder / "jpg"
    images = [str(jpg / f"{n}.jpg") for n in data["imlist"]]
    queries = [str(jpg / f"{n}.jpg") for n in data["qimlist"]]
    _check_files(images, "database images", gnd_path)
    _check_files(queries, "query images", gnd_path)
    return Benchmark(
        name=name,
        images=images,
        queries=queries,
        qboxes=[g["bbx"] for g in data["gnd"]],
        gnd=[{k: g[k] for k in ("easy", "hard", "junk")} for g in data["gnd"]],
        groups=None,
        protocol="revisitop",
    )


def load_grouped(folder: str | os.PathLike, group_size: int = 4,
                 name: str | None = None) -> Benchmark:
    """Load a UKBench-style grouped collection: every image is a query and a database image.

    Args:
        folder: folder with ``jpg/*.jpg``; in sorted order, images ``k*group_size`` to
            ``k*group_size + group_size - 1`` form group k.
        group_size: images per group.
        name: benchmark name; defaults to the folder's name.

    Returns:
        A :class:`Benchmark` with protocol ``'grouped'``: ``gnd[i]['easy']`` is the group of
        image i (i included), ``hard`` and ``junk`` are empty, boxes are None.

    Raises:
        FileNotFoundError: no ``jpg`` folder or no images in it.
        ValueError: the image count is not a multiple of ``group_size``.
    """
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    folder = Path(os.path.abspath(os.fspath(folder)))
    jpg = folder / "jpg"
    if not jpg.is_dir():
        raise FileNotFoundError(f"grouped benchmark: no image folder {jpg}")
    images = sorted(str(p) for p in jpg.glob("*.jpg") if p.is_file())
    if not images:
        raise FileNotFoundError(f"grouped benchmark: no *.jpg files in {jpg}")
    if len(images) % group_size:
        raise ValueError(f"grouped benchmark {jpg}: {len(images)} images is not a multiple of "
                         f"group_size={group_size}")
    groups = np.arange(len(images), dtype=np.int64) // group_size  # (N,)
    empty = np.empty(0, dtype=np.int64)
    gnd = [{"easy": np.arange(g * group_size, (g + 1) * group_size, dtype=np.int64),
            "hard": empty.copy(), "junk": empty.copy()} for g in groups]
    return Benchmark(
        name=name if name is not None else folder.name,
        images=images,
        queries=list(images),
        qboxes=[None] * len(images),
        gnd=gnd,
        groups=groups,
        protocol="grouped",
    )


def load_benchmark(name: str, data_root: str | os.PathLike) -> Benchmark:
    """Load a benchmark by name: ``ukbench*`` is grouped, anything else revisitop layout.

    Args:
        name: benchmark folder name under ``data_root`` (e.g. ``'rparis6k-mini'``,
            ``'ukbench-56'``, ``'demo'``).
        data_root: folder holding the benchmark folders.

    Returns:
        The loaded :class:`Benchmark`.
    """
    if name.lower().startswith("ukbench"):
        return load_grouped(Path(data_root) / name, group_size=4, name=name)
    return load_revisitop(data_root, name)



def prepare_benchmark(name: str, data_root: str | os.PathLike) -> Benchmark:
    """`load_benchmark`, generating the embedded demo collection first when it is missing."""
    if name == "demo" and not (Path(data_root) / "demo" / "gnd_demo.json").is_file():
        from raytrieval.evaluation.demo import generate_demo

        generate_demo(Path(data_root))
    return load_benchmark(name, data_root)
