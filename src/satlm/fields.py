"""Settings declared as dataclass fields (SATConfig, and a run config's sections): what a field's metadata says, the
one validator that reads it, and the reading of loosely typed values (YAML, key=value overrides, command-line
flags) as a field's type.

Metadata keys (TRL's style, `field(default=..., metadata={"help": ..., "choices": [...]})`):
- help: what the setting does (required; `satlm keys --describe` and `satlm bench --help` print it);
- choices: the allowed values;
- range: a number's interval, "[0, 1)", "[1, inf)", "(0, inf)" (for a list of numbers: each element's);
- expects: what a value must be, where the type does not say it ("a list of integer layer indices");
- null: what null means, for a field that may be null ("all").
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import types
import typing
from typing import Any, Callable, NamedTuple, Union


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float
        return False


def is_number(value: Any) -> bool:
    """A real number, finite (numpy scalars count; bools and strings do not)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and _finite(value)


def _is_a(value: Any, kind) -> bool:
    """Whether value is of the plain type `kind` (bool, int, float, str, list, dict or Any); a float is any real
    number (finite or not: the range says), a list may be a tuple."""
    if kind is Any:
        return True
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if kind is list:
        return isinstance(value, (list, tuple))
    return isinstance(value, kind)


_RANGE = re.compile(r"^([\[(])\s*(-inf|[-+0-9.e]+)\s*,\s*(inf|[-+0-9.e]+)\s*([\])])$")


@functools.lru_cache(maxsize=None)
def _parse_range(text: str) -> tuple[float, float, bool, bool, str]:
    """'[0, 1)' -> (0, 1, low closed, high closed, 'in [0, 1)'); '[1, inf)' reads '>= 1', '(0, inf)' '> 0'."""
    m = _RANGE.match(text)
    if m is None:
        raise ValueError(f"bad range {text!r} in a field's metadata")
    lo, hi = float(m.group(2)), float(m.group(3))
    lo_closed, hi_closed = m.group(1) == "[", m.group(4) == "]"
    low = m.group(2)
    if math.isinf(hi) and not math.isinf(lo):
        words = f"{'>=' if lo_closed else '>'} {low}"
    elif math.isinf(lo) and not math.isinf(hi):
        words = f"{'<=' if hi_closed else '<'} {m.group(3)}"
    else:
        words = f"in {text}"
    return lo, hi, lo_closed, hi_closed, words


def _in_range(value: float, text: str) -> bool:
    lo, hi, lo_closed, hi_closed, _ = _parse_range(text)
    return (lo <= value if lo_closed else lo < value) and (value <= hi if hi_closed else value < hi)


_NOUNS = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list",
          dict: "a mapping"}
_PLURALS = {int: "integers", float: "numbers", str: "strings"}


class FieldSpec(NamedTuple):
    """One field's declaration, read from its type hint and metadata."""

    name: str
    kinds: tuple  # the plain types a value may have (None excluded)
    nullable: bool
    element: Any  # a list's element type when it is a plain int, float or str; else None (not checked here)
    choices: tuple | None
    range: str | None
    expects: str | None
    null: str | None
    help: str
    default: Any

    def _null_words(self) -> str:
        return (" or null" + (f" ({self.null})" if self.null else "")) if self.nullable else ""

    def _kind_words(self) -> str:
        if self.expects:
            return self.expects
        if self.choices is not None:
            return "one of " + ", ".join(map(str, self.choices))
        return " or ".join(f"a list of {_PLURALS[self.element]}" if kind is list and self.element is not None
                           else _NOUNS.get(kind, getattr(kind, "__name__", str(kind))) for kind in self.kinds)

    def type_words(self) -> str:
        """What a value must be, by type: 'an integer', 'a number or null', 'a list of integers', ..."""
        return self._kind_words() + self._null_words()

    def words(self) -> str:
        """What a value must be, type and range: 'a number in [0, 1)', 'an integer >= 1 or null', ..."""
        kind = self._kind_words()
        if self.range is not None and not self.expects and self.choices is None:
            kind += " " + _parse_range(self.range)[4]
        return kind + self._null_words()

    def range_words(self, value: Any) -> str:
        """'>= 1', 'in (0, 1)', '> 0 or null (...)', or 'a finite number > 0' for a value that is not finite."""
        words = _parse_range(self.range)[4] if self.range else ""
        if isinstance(value, numbers.Real) and not _finite(value):
            words = f"a finite number {words}".rstrip()
        return words + self._null_words()


class Problem(NamedTuple):
    """What is wrong with one field's value. kind: type (not of the field's type), choice (not one of its choices),
    range (a number outside its range, or not finite) or value (a list with a wrong element)."""

    spec: FieldSpec
    value: Any
    kind: str

    def words(self) -> str:
        """The problem, without the field's name: 'must be a number in [0, 1)', 'is not allowed; choose one of ...'."""
        if self.kind == "choice":
            return f"is not allowed; choose one of {', '.join(map(str, self.spec.choices))}"
        return f"must be {self.spec.words()}"

    def as_field(self, prefix: str) -> str:
        """`SATConfig.x=v must be ...` (SATConfig's style)."""
        return f"{prefix}{self.spec.name}={self.value!r} {self.words()}"

    def as_key(self, prefix: str) -> str:
        """`config key 'x' ...` (a run config's style)."""
        key = f"config key {prefix + self.spec.name!r}"
        if self.kind == "type":
            return f"{key} expects {self.spec.type_words()}, got {self.value!r}"
        if self.kind == "choice":
            return f"{key} is {self.value!r}; choose one of {', '.join(map(str, self.spec.choices))}"
        if self.kind == "range":
            return f"{key} must be {self.spec.range_words(self.value)}, got {self.value!r}"
        return f"{key} must be {self.spec.words()}, got {self.value!r}"


def _hint_kinds(hint) -> tuple[tuple, bool, Any]:
    """(plain types, nullable, list element type) of a type hint such as `float | None` or `list[int] | None`."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
    nullable = type(None) in args
    kinds, element = [], None
    for a in args:
        if a is type(None):
            continue
        origin = typing.get_origin(a) or a
        if origin is tuple:
            origin = list
        kinds.append(origin)
        if origin is list:
            inner = typing.get_args(a)
            if len(inner) == 1 and inner[0] in (int, float, str):
                element = inner[0]
    return tuple(kinds), nullable, element


@functools.lru_cache(maxsize=None)
def field_specs(cls) -> dict[str, FieldSpec]:
    """Every field of a settings dataclass, by name, as declared (sections such as RunConfig.data are left out)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            continue  # a section (RunConfig.data, .sat, .lora): its own fields are declared in its class
        if "help" not in f.metadata:
            raise TypeError(f"{cls.__name__}.{f.name} is declared without metadata['help']")
        kinds, nullable, element = _hint_kinds(hints[f.name])
        meta = f.metadata
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out[f.name] = FieldSpec(f.name, kinds, nullable, element, tuple(meta["choices"]) if "choices" in meta else None,
                                meta.get("range"), meta.get("expects"), meta.get("null"), meta["help"], default)
    return out


def field_problem(spec: FieldSpec, value: Any) -> Problem | None:
    """What is wrong with `value` for the field `spec`, or None."""
    if value is None and spec.nullable:
        return None
    if spec.choices is not None:
        try:
            ok = value in spec.choices
        except (TypeError, ValueError):  # a value that does not compare (an array, ...)
            ok = False
        return None if ok else Problem(spec, value, "choice")
    kind = None if value is None else next((k for k in spec.kinds if _is_a(value, k)), None)
    if kind is None:
        return Problem(spec, value, "type")
    if kind is list and spec.element is not None:
        for item in value:
            if not _is_a(item, spec.element) or (spec.element is float and not _finite(item)):
                return Problem(spec, value, "value")
            if spec.range and not _in_range(item, spec.range):
                return Problem(spec, value, "value")
    elif kind in (int, float):
        if kind is float and not _finite(value):
            return Problem(spec, value, "range")
        if spec.range and not _in_range(value, spec.range):
            return Problem(spec, value, "range")
    return None


def check_fields(obj, error: Callable[[Problem], Exception]) -> None:
    """The one validator of declared fields: each value's type, choices and range as its field declares them; the
    first problem is raised as error(problem) (each class words its own errors)."""
    for name, spec in field_specs(type(obj)).items():
        problem = field_problem(spec, getattr(obj, name))
        if problem is not None:
            raise error(problem)


def _read_as(value: Any, kind) -> tuple[bool, Any]:
    """(True, value read as `kind`) where a loosely typed value reads as one without loss, else (False, value)."""
    if kind is Any or (kind is bool and isinstance(value, bool)):
        return True, value
    if isinstance(value, bool) or kind is bool:
        return False, value
    if kind in (int, float) and isinstance(value, str):
        try:
            return True, kind(value.strip())  # YAML 1.1 reads 1e-4 as a string
        except (ValueError, OverflowError):
            return False, value
    if kind is int and isinstance(value, float) and value.is_integer():
        return True, int(value)
    if kind is int and isinstance(value, int) or kind is float and isinstance(value, (int, float)):
        try:
            return True, kind(value)
        except OverflowError:  # an integer too large for a float
            return False, value
    if kind is str and isinstance(value, (str, int, float)):
        return True, str(value)
    if kind is list and isinstance(value, (list, tuple)):
        return True, list(value)
    if kind is dict and isinstance(value, dict):
        return True, dict(value)
    return False, value


def read_value(spec: FieldSpec, value: Any) -> Any:
    """A loosely typed value (from YAML, a key=value override or a command-line flag) read as the field's type
    where it reads as one without loss: '1e-4' as a float, 4.0 as an integer, 3 as a string. It converts and
    never judges: whatever does not read as the type is returned as it is, for check_fields to refuse."""
    if value is None:
        return value
    exact = next((k for k in spec.kinds if _is_a(value, k) and (k is not float or isinstance(value, float))), None)
    if exact is not None:  # an exact type first (resume: true stays a bool, a path stays a string)
        return _read_as(value, exact)[1]
    for kind in spec.kinds:
        ok, read = _read_as(value, kind)
        if ok:
            return read
    return value
