"""`paratrain config`: the resolved config with every default, as TOML, and `--describe`: every
key with its type, default, allowed values and one line of meaning.

Both are generated from the dataclasses in config.py, so they cannot drift from what a run
reads: the type and default from the field, the allowed values from its `Literal` or its check,
the meaning from the comment on the field's line (or the comment lines right above it) in
config.py's source. tomllib reads TOML but does not write it; the writer here covers what a
config holds (strings, numbers, booleans, lists, inline tables).
"""
from __future__ import annotations

import dataclasses
import inspect
import io
import json
import math
import tokenize
import types
import typing
from typing import Literal, get_args, get_origin

from paratrain.config import Config


@dataclasses.dataclass
class Key:
    name: str  # "section.key" or "section.sub.key"
    type: str
    default: object
    allowed: str
    meaning: str


def _comments(cls) -> dict[str, str]:
    """{field name: its comment}: the comment on its line, else the comment lines just above it."""
    source = inspect.getsource(cls)
    out, above, line_of = {}, [], {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if tok.start[0] in line_of:  # after a field on the same line
                out[line_of[tok.start[0]]] = text
            else:
                above.append(text)
        elif tok.type == tokenize.NAME and tok.start[1] == 4 and tok.start[0] not in line_of:
            name = tok.string
            if name in {f.name for f in dataclasses.fields(cls)}:
                line_of[tok.start[0]] = name
                if above:
                    out[name] = " ".join(above)
                above = []
        elif tok.type == tokenize.NL and tok.start[1] == 0 and tok.line.strip() == "":
            above = []  # a blank line ends a block of comments
    return out


def _type_words(hint) -> tuple[str, str]:
    """(type, allowed values) of a field's annotation."""
    if get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_words(h)[0] for h in get_args(hint)), ""
    if get_origin(hint) is Literal:
        choices = get_args(hint)
        return "string", ", ".join(json.dumps(c) for c in choices)
    if get_origin(hint) is tuple:
        args = get_args(hint)
        if Ellipsis in args:
            return f"list of {_type_words(args[0])[0]}s", ""
        return f"list of {len(args)} {_type_words(args[0])[0]}s", ""
    return {int: "integer", float: "number", bool: "boolean", str: "string", dict: "table"}.get(hint, str(hint)), ""


def keys(cls=Config, prefix: str = "") -> list[Key]:
    """Every leaf key of the config, in the order config.py declares them."""
    hints, comments, out = typing.get_type_hints(cls), _comments(cls), []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += keys(hint, f"{prefix}{f.name}.")
            continue
        kind, allowed = _type_words(hint)
        if "check" in f.metadata:
            allowed = f.metadata["check"][1]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(Key(prefix + f.name, kind, default, allowed, comments.get(f.name, "")))
    return out


def describe() -> str:
    lines = []
    for k in keys():
        allowed = f"; allowed: {k.allowed}" if k.allowed else ""
        lines.append(f"{k.name} ({k.type}, default {_value(k.default)}{allowed})\n    {k.meaning or '-'}")
    return "\n".join(lines)


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_name(k)} = {_value(x)}" for k, x in v.items()) + "}"
    if isinstance(v, int):
        return str(v)
    return json.dumps(str(v))  # a TOML basic string


def _name(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def to_toml(cfg: Config) -> str:
    """The whole config as TOML, every key written: `paratrain run` of this file is this config."""
    out: list[str] = []

    def table(obj, path: str) -> None:
        subs = []
        if path:
            out.append(f"\n[{path}]")
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            if dataclasses.is_dataclass(v):
                subs.append((v, f"{path}.{f.name}" if path else f.name))
            else:
                out.append(f"{f.name} = {_value(v)}")
        for v, p in subs:
            table(v, p)

    table(cfg, "")
    return "\n".join(out).lstrip("\n") + "\n"


def config_command(args) -> int:
    if args.describe:
        print(describe())
        return 0
    from paratrain.config import load_config

    print(to_toml(load_config(args.config, args.set)), end="")
    return 0
