"""The one base class of the settings dataclasses (``TrainConfig``, ``CompareConfig``, ``StudyConfig``,
``SAETrainConfig``, ``Condition``): plain-dict round trips, so that the CLI, provenance records and
notebooks write and read settings the same way.

``to_dict()`` gives JSON-ready data (tuples as lists); ``from_dict(d)`` builds the config back,
turning lists into tuples for tuple-typed fields, and refuses keys the config does not have.
Validation stays in each config's ``__post_init__`` (raising :class:`~lens_roles.errors.ConfigError`),
so a dict read back is checked exactly like a config built by hand.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Mapping

from lens_roles.errors import ConfigError
from lens_roles.io import to_plain


def _is_tuple_type(hint) -> bool:
    """Whether ``hint`` is a tuple type, or a union (``X | None``) with one."""
    if typing.get_origin(hint) is tuple or hint is tuple:
        return True
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_is_tuple_type(arg) for arg in typing.get_args(hint))
    return False


class Config:
    """Mixin for frozen settings dataclasses: ``to_dict`` / ``from_dict`` round trips."""

    def to_dict(self) -> dict[str, Any]:
        """Every field by name, as plain JSON data (tuples become lists)."""
        return {f.name: to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """The config with these fields (missing ones keep their defaults).

        Lists given for tuple-typed fields are turned back into tuples.

        Raises:
            ConfigError: naming the keys the config does not have (and the ones it has),
                or, from ``__post_init__``, naming a field whose value it cannot use.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"{cls.__name__}.from_dict needs a mapping of field names to values, "
                              f"got {type(data).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"{cls.__name__} has no field(s) {', '.join(map(repr, unknown))}; "
                              f"its fields are {', '.join(names)}")
        hints = typing.get_type_hints(cls)
        values = {k: tuple(v) if isinstance(v, list) and _is_tuple_type(hints[k]) else v for k, v in data.items()}
        return cls(**values)
