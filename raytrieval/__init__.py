"""raytrieval: an unlabeled photo collection in, a fine-tuned retrieval model and a live search endpoint out.

The repository's top-level folders are the subpackages: `raytrieval.retrieval` (the core, no
Ray), `raytrieval.mining`, `raytrieval.evaluation`, `raytrieval.serving`, `raytrieval.trainers`
and `raytrieval.cluster` (CLI, pipeline, runtime). An installed copy maps them through
pyproject.toml; a source tree (a checkout, or the working directory of `ray job submit
--working-dir .`) finds them beside this folder.
"""

from pathlib import Path

__version__ = "0.1.0"

_source_tree = Path(__file__).resolve().parent.parent
if (_source_tree / "pyproject.toml").is_file() and (_source_tree / "retrieval" / "__init__.py").is_file():
    __path__.append(str(_source_tree))  # noqa: F821 - the package's own search path
