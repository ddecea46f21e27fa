"""The one YAML config-file reader of the training, sweep and pipeline configs and the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def read_yaml_mapping(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The mapping in a YAML config file, with the not-None `overrides` applied on top.

    Args:
        path: the YAML file (an empty file is an empty mapping).
        overrides: fields replacing the file's; None values are left out.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file holds something other than a mapping.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config: no such file {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"config: {path} must hold a mapping of fields, got {type(data).__name__}")
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return data
