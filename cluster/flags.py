"""Command-line flags generated from config classes: their names, types, defaults and help.

A config class (a dataclass, or a pydantic model such as the Serve app's arguments) is the one
source of a setting. `add_fields` turns its fields into `--flags` (the help is the field's
entry in a dataclass docstring's ``Args:`` or a pydantic field's description, the default is
the field's), and `given` collects the flags the user passed, so that everything else keeps
the class default or the value of a YAML file.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from typing import Any, Callable, Iterable, Mapping

_NONE_WORDS = ("none", "None", "null")


def field_help(cls: type) -> dict[str, str]:
    """{field name: its description} from the ``Args:`` section of `cls`'s docstring."""
    lines = (cls.__doc__ or "").splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if start is None:
        return {}
    out: dict[str, str] = {}
    indent, name = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            break
        depth = len(line) - len(line.lstrip())
        indent = depth if indent is None else indent
        entry = re.match(r"(\w+): (.*)", line.strip())
        if depth < indent:
            break
        if depth == indent and entry:
            name = entry.group(1)
            out[name] = entry.group(2)
        elif name is not None:
            out[name] += " " + line.strip()
    return out


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    kind: Any
    default: Any  # dataclasses.MISSING when required
    help: str | None


def config_fields(cls: type) -> list[_Field]:
    """The fields of a dataclass or a pydantic model: name, type, default and description."""
    if dataclasses.is_dataclass(cls):
        hints, docs = typing.get_type_hints(cls), field_help(cls)
        return [_Field(f.name, hints[f.name], _default(f), docs.get(f.name)) for f in dataclasses.fields(cls)]
    out = []
    for name, info in cls.model_fields.items():  # pydantic
        default = dataclasses.MISSING if info.is_required() else info.get_default(call_default_factory=True)
        out.append(_Field(name, info.annotation, default, info.description))
    return out


def _optional(kind: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(kind)) == 2:
            return args[0], True
    return kind, False


def _comma_list(item: Callable[[str], Any]) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        try:
            return tuple(item(v.strip()) for v in text.split(",") if v.strip())
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}") from exc

    return parse


def converter(kind: Any) -> tuple[Callable[[str], Any] | None, bool]:
    """(parser of one flag value, is it a switch) for a field's annotation.

    `X | None` also takes 'none'; `tuple[X, ...]` takes 'a,b,c'; `bool` is a switch; a
    `list[X]` flag is repeated (see `add_fields`).

    Raises:
        TypeError: an annotation no flag can express (dicts, nested configs).
    """
    inner, nullable = _optional(kind)
    if inner is bool:
        return None, True
    if typing.get_origin(inner) is tuple and typing.get_args(inner)[1:] == (Ellipsis,):
        parse = _comma_list(typing.get_args(inner)[0])
    elif typing.get_origin(inner) is list and typing.get_args(inner)[0] in (int, float, str):
        parse = typing.get_args(inner)[0]
    elif inner in (int, float, str):
        parse = inner
    else:
        raise TypeError(f"no command-line flag for a field of type {kind}")
    if not nullable:
        return parse, False
    return (lambda text: None if text in _NONE_WORDS else parse(text)), False


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _shown(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return ",".join(str(v) for v in value) or "none"
    return str(value)


def add_fields(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    cls: type,
    key: str,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    rename: Mapping[str, str] | None = None,
    parse: Mapping[str, Callable[[str], Any]] | None = None,
    defaults: Mapping[str, Any] | None = None,
    from_config: bool = False,
) -> None:
    """Add a `--flag` per field of the config class `cls`; read them back with `given(args, key)`.

    Args:
        parser: the parser or argument group.
        cls: the config dataclass or pydantic model.
        key: a name for this group of flags, unique in the parser.
        only: just these fields (in this order); skip: leave these out.
        rename: field -> flag name, where the command line has its own name.
        parse: field -> value parser, where the type alone does not say (e.g. byte sizes).
        defaults: field -> this command's default, where it is not the dataclass's.
        from_config: the values come from a YAML file first: the help says so.
    """
    rename, parse, defaults = dict(rename or {}), dict(parse or {}), dict(defaults or {})
    fields = {f.name: f for f in config_fields(cls)}
    names = list(only) if only is not None else [n for n in fields if n not in set(skip)]
    for name in names:
        f = fields[name]
        value, switch = converter(f.kind)
        value = parse.get(name, value)
        default = defaults.get(name, f.default)
        text = f.help
        if text is None:
            raise ValueError(f"{cls.__name__}.{name}: no help (an entry in the docstring's Args, or a description)")
        if default is dataclasses.MISSING:
            text += " (required)"
        elif from_config:
            text += f" (default: the config's, else {_shown(default)})"
        else:
            text += f" (default: {_shown(default)})"
        kwargs: dict[str, Any] = dict(dest=f"{key}.{name}", default=argparse.SUPPRESS, help=text.replace("%", "%%"))
        if switch:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(_optional(f.kind)[0]) is list:
            kwargs.update(type=value, action="append", metavar=rename.get(name, name).upper())
        else:
            kwargs.update(type=value, metavar=rename.get(name, name).upper())
        kwargs["required"] = default is dataclasses.MISSING and not from_config
        parser.add_argument("--" + rename.get(name, name).replace("_", "-"), **kwargs)
    if defaults:
        parser.set_defaults(**{f"{key}.{name}": v for name, v in defaults.items()})


def given(args: argparse.Namespace, key: str) -> dict[str, Any]:
    """{field: value} of the flags of `key` the user passed (and this command's defaults)."""
    prefix = key + "."
    return {dest[len(prefix):]: v for dest, v in vars(args).items() if dest.startswith(prefix)}
