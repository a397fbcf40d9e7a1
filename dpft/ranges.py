"""Config fields that carry their help text and their allowed range, and the one validator that reads them.

Every numeric option declares its range where it is defined::

    lr: float = _f(1e-4, "peak learning rate (AdamW)", ">0")
    gamma: float = _f(0.99, "discount", "[0,1]")
    keep_checkpoints: int = _f(3, "newest checkpoints kept", ">=0", "0 = keep all")

and :func:`check_ranges` checks an instance (recursing into sections), naming the dotted key, the value and the
range in a :class:`~dpft.errors.DpftError`. ``None`` passes (whether a field may be ``None`` is its type's business,
checked by OmegaConf). For a list the range applies to every entry. NaN and infinity are always refused.

A leaf module (imports nothing of dpft but the error class) so that every config module can use it without
import circles. Python 3.8 (beside Isaac Gym).
"""
from __future__ import annotations

import math
import re
from dataclasses import field, fields, is_dataclass
from typing import Any, Optional, Tuple

from dpft.errors import DpftError

_INF = float("inf")
_SPEC = re.compile(r"^\s*(?:(>=|>)\s*(\S+)|([\[(])\s*([^,\s]+)\s*,\s*([^\]\)\s]+)\s*([\])]))\s*$")

#: (low, high, low inclusive, high inclusive)
Range = Tuple[float, float, bool, bool]


def parse_range(spec: str) -> Range:
    """``">=1"``, ``">0"``, ``"[0,1]"``, ``"(0,1]"``, ``"[0,1)"`` -> ``(low, high, low_inclusive, high_inclusive)``."""
    m = _SPEC.match(spec)
    if not m:
        raise ValueError("bad range spec %r (expected >=X, >X or [a,b] with ( ) for open ends)" % (spec,))
    if m.group(1):
        return float(m.group(2)), _INF, m.group(1) == ">=", True
    return float(m.group(4)), float(m.group(5)), m.group(3) == "[", m.group(6) == "]"


def _f(default: Any = None, help: str = "", range: Optional[str] = None, meaning: str = "",
       factory: Any = None) -> Any:
    """A dataclass field with its help text (``dpft <command> --help``) and, for numbers, its allowed ``range``
    (:func:`parse_range` syntax) with an optional note on what special values mean (shown with a refused value)."""
    meta = {"help": help}
    if range is not None:
        meta["range"] = parse_range(range)
        meta["meaning"] = meaning
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def range_text(lo: float, hi: float, lo_inc: bool, hi_inc: bool) -> str:
    def num(x: float) -> str:
        return ("%d" % x) if float(x).is_integer() else repr(x)

    if hi == _INF:
        return "%s %s" % (">=" if lo_inc else ">", num(lo))
    return "in %s%s, %s%s" % ("[" if lo_inc else "(", num(lo), num(hi), "]" if hi_inc else ")")


def field_range(obj: Any, name: str) -> Optional[Range]:
    """The declared range of field ``name`` of a schema class or instance (None when it has none)."""
    for f in fields(obj):
        if f.name == name:
            return f.metadata.get("range")
    return None


def check_ranges(obj: Any, prefix: str = "") -> None:
    """Check every field of a schema instance (and its sub-sections) that declares a range; raises a DpftError
    naming the key (dotted with ``prefix``), the value and the allowed range."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        if is_dataclass(value):
            check_ranges(value, prefix + f.name + ".")
            continue
        rng = f.metadata.get("range")
        if rng is None or value is None:
            continue
        lo, hi, lo_inc, hi_inc = rng
        values = list(value) if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue  # the schema's types are checked by OmegaConf
            ok = math.isfinite(v) and (v >= lo if lo_inc else v > lo) and (v <= hi if hi_inc else v < hi)
            if not ok:
                is_list = isinstance(value, (list, tuple))
                shown = "[" + ",".join(str(x) for x in value) + "]" if is_list else v
                meaning = f.metadata.get("meaning", "")
                raise DpftError("%s%s=%s must be %s%s%s" % (
                    prefix, f.name, shown, range_text(lo, hi, lo_inc, hi_inc), " in every entry" if is_list else "",
                    (" (%s)." % meaning) if meaning else "."))


__all__ = ["_f", "check_ranges", "parse_range", "range_text", "field_range"]
