"""Frames: a message is a dataclass with a TAG; on the wire, the msgpack encoding of
`[tag, {field: value, ...}]`. Every message class registers its tag when defined, so `decode`
finds the class by tag (receivers then dispatch on the type with a dict, not an isinstance chain).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack


class ProtocolError(ValueError):
    """A frame that is not a known message or whose fields do not match its type."""


_REGISTRY: dict[str, type[Message]] = {}


@dataclass
class Message:
    TAG: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.TAG:
            assert cls.TAG not in _REGISTRY, f"duplicate message tag {cls.TAG}"
            _REGISTRY[cls.TAG] = cls

    def to_wire(self) -> dict[str, Any]:
        attrs = self.__dict__
        names = field_names(type(self))
        if len(attrs) == len(names):  # the fields and nothing else (as always): one C-level copy
            return attrs.copy()
        return {name: attrs[name] for name in names}

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> Message:
        return cls(**data)


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def field_names(cls: type) -> tuple[str, ...]:
    """The dataclass fields of cls, in declaration order (cached: `dataclasses.fields` is slow)."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def encode(msg: Message) -> bytes:
    return msgpack.packb([msg.TAG, msg.to_wire()], use_bin_type=True)


def decode(frame: bytes) -> Message:
    try:
        tag, data = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        cls = _REGISTRY[tag]
        return cls.from_wire(data)
    except (KeyError, TypeError, ValueError, msgpack.exceptions.ExtraData) as exc:
        raise ProtocolError(f"bad frame: {exc!r}") from exc
