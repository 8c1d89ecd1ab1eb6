"""Checks on values read from files (config.json, adapter_config.json, GGUF metadata), made before anything is
built from them: each failure is a one-line ValueError naming the file and the key.

JSON has no integer type of its own (`1e5` reads as the float 100000.0) and hostile files hold strings where
numbers belong ("16"), so a value is checked against the annotation of the dataclass field it fills: `int` means
an int (not a bool, not a float), `float` a finite int or float, `bool` true / false, `X | None` also null.
"""
import json
import math
import os
import resource
import types
import typing
from pathlib import Path

# The largest dimension or count we accept from a file. No released model comes near it (vocabularies reach ~2**18,
# hidden sizes ~2**15), and two of them multiply to under 2**63, so even a meta-device model of them can be built.
MAX_SIZE = 2**24
# The most layers a stack read from a file may have (the largest released models have ~2**7): building an LSTM of
# 10**4 layers takes minutes, even on the meta device.
MAX_LAYERS = 1024


def read_json(file):
    """A JSON file's value; a file that is not UTF-8 or not JSON is a one-line ValueError naming it."""
    try:
        return json.loads(Path(file).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file}: invalid JSON ({e})") from None


def _short(value) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def matches(value, tp) -> bool:
    """Whether a JSON value fits the annotation `tp` (int, float, bool, str, dict, list, list[X], X | Y, None)."""
    if tp is None or tp is type(None):
        return value is None
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return any(matches(value, t) for t in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(matches(v, item) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def describe(tp) -> str:
    if tp is None or tp is type(None):
        return "null"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(describe(t) for t in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"a list of {describe(typing.get_args(tp)[0]).split(' ', 1)[-1]}s"
    return {int: "an integer", float: "a finite number", bool: "true or false", str: "a string", dict: "an object",
            list: "a list"}.get(tp, tp.__name__)


def expect(value, tp, source, key: str):
    """`value` if it fits `tp`, else a ValueError "<source>: <key> must be <tp>, got <value>"."""
    if not matches(value, tp):
        raise ValueError(f"{source}: {key} must be {describe(tp)}, got {_short(value)}")
    return value


def size(value, source, key: str, limit: int | None = MAX_SIZE) -> int:
    """A dimension or count: an integer in 1 .. limit."""
    if not (matches(value, int) and value > 0 and (limit is None or value <= limit)):
        most = f" (at most {limit})" if limit is not None else ""
        raise ValueError(f"{source}: {key} must be a positive integer{most}, got {_short(value)}")
    return value


def positive(value, source, key: str) -> float:
    """A finite number > 0 (an epsilon, a rope base, a scaling factor)."""
    if not (matches(value, float) and value > 0):
        raise ValueError(f"{source}: {key} must be a finite number > 0, got {_short(value)}")
    return value


def memory_bytes() -> int:
    """This process's memory: the machine's physical memory, or less under an address-space limit (ulimit -v).
    What a size read from a file is held against when the file itself does not show it."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    return physical if limit == resource.RLIM_INFINITY else min(physical, limit)
