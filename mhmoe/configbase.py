"""Typed dataclass configs: strict construction from dicts, dotted overrides, JSON round-trip.

Every config in mhmoe (FFNConfig, ModelConfig, TrainConfig, ...) subclasses `Config`. Unknown keys and values of
the wrong type raise `ConfigError` (a `ValueError`) whose message names the field and the fix, so that a typo in
`--set model.ffn.top_k=2` is a one-line error rather than a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, ClassVar, TypeVar, get_args, get_origin, get_type_hints

from mhmoe.errors import ConfigError

C = TypeVar("C", bound="Config")



def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert `value` (from JSON or a CLI string) to the annotated type `tp`, or raise ConfigError."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        allowed = get_args(tp)
        if value in allowed:
            return value
        raise ConfigError(f"{where}: {value!r} is not allowed; use one of {', '.join(map(repr, allowed))}")
    if origin in (tuple, list):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp,) = get_args(tp)[:1] or (Any,)
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return tp.from_dict(value, prefix=f"{where}.")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")


@dataclasses.dataclass(frozen=True)
class Config:
    """Base class: subclasses are frozen dataclasses that validate themselves in `validate()`."""

    # {field: {old value: new value}}: values that older configs (run directories, scripts) wrote for a field
    # whose type has since changed; translated before the type check, so those configs still load.
    LEGACY: ClassVar[dict[str, dict[Any, Any]]] = {}

    @classmethod
    def _upgrade(cls, name: str, value: Any) -> Any:
        table = cls.LEGACY.get(name)
        if not table or not isinstance(value, (bool, str)):  # only scalars from JSON or the command line
            return value
        key = value.lower() == "true" if isinstance(value, str) and value.lower() in ("true", "false") else value
        return table.get(key, value)

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = self._upgrade(f.name, getattr(self, f.name))
            coerced = _coerce(value, hints[f.name], f"{type(self).__name__}.{f.name}")
            if coerced is not getattr(self, f.name):
                object.__setattr__(self, f.name, coerced)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for invalid combinations; overridden by subclasses."""

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any], prefix: str = "") -> C:
        """Build from a mapping; unknown keys are an error naming the key and the valid ones."""
        if not isinstance(data, dict):
            raise ConfigError(f"{prefix or cls.__name__}: expected a mapping, got {data!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(
                f"{prefix}{unknown[0]}: unknown key for {cls.__name__}; valid keys: {', '.join(sorted(names))}"
            )
        hints = get_type_hints(cls)
        kwargs = {k: _coerce(cls._upgrade(k, v), hints[k], f"{prefix}{k}") for k, v in data.items()}
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable mapping (nested configs become nested dicts)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Config):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def replace(self: C, **changes: Any) -> C:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def override(self: C, dotted: str, value: Any) -> C:
        """A copy with `a.b.c=value` applied; the value is coerced to the field's type (CLI strings welcome)."""
        head, _, rest = dotted.partition(".")
        names = {f.name for f in dataclasses.fields(self)}
        if head not in names:
            raise ConfigError(
                f"{dotted}: unknown key for {type(self).__name__}; valid keys: {', '.join(sorted(names))}"
            )
        current = getattr(self, head)
        if rest:
            if not isinstance(current, Config):
                raise ConfigError(f"{dotted}: {head} is not a nested config")
            try:
                return self.replace(**{head: current.override(rest, value)})
            except ConfigError as e:
                msg = str(e)
                raise ConfigError(f"{head}.{msg}" if msg.startswith(rest.split(".")[0]) else msg) from None
        hint = get_type_hints(type(self))[head]
        if isinstance(value, str) and (hint is Any or get_origin(hint) in (dict,)):
            value = json.loads(value)
        value = self._upgrade(head, value)
        return self.replace(**{head: _coerce(value, hint, f"{type(self).__name__}.{head}")})
