"""The pass contract and the one registry of passes.

A pass is a dataclass whose fields are its options. Calling it on a GraphModule
rewrites the module and returns it, writing a :class:`~netsurgeon.report.PassRecord`.
Options are checked against their type hints (``int``, ``float``, ``bool``, ``str``,
``Literal``, unions of these) when the pass is made; :meth:`Pass.validate` adds ranges.

Example:
    >>> from netsurgeon.passes import get_pass
    >>> get_pass("strip_bn")(mode="remove").options()
    {'mode': 'remove'}
"""
from __future__ import annotations

import dataclasses
import difflib
import numbers
import types
import typing
from typing import Any, ClassVar, Mapping, Sequence, Union

import torch
import torch.fx as fx

from ..errors import InvalidArgumentError, PassOptionError, UnknownPassError
from ..report import PassRecord, Preservation
from .runner import apply_pass

__all__ = ["Pass", "PassSpec", "register_pass", "get_pass", "list_passes", "make_pass", "coerce_option"]

_REGISTRY: dict[str, type["Pass"]] = {}
_TYPE_WORDS = {type(None): "None", bool: "a bool (True or False)", int: "an int", float: "a float (or an int)",
               str: "a string"}
_TEXT_WORDS = {type(None): "none", bool: "true or false", int: "an int", float: "a float", str: "a string"}


@dataclasses.dataclass
class Pass:
    """Base class of every pass; subclasses are dataclasses whose fields are options.

    Subclasses set ``name`` and ``summary``, implement :meth:`run` and, when the
    preservation depends on options, override :meth:`preservation`; options with a valid
    range extend :meth:`validate`.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    preserves: ClassVar[Preservation] = Preservation.NONE

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every option against its type hint; subclasses check ranges after calling this.

        Raises:
            PassOptionError: names the pass, the option, the value and what is expected.
        """
        for f in dataclasses.fields(self):
            _check_value(type(self), f.name, getattr(self, f.name))

    def _require(self, key: str, ok: bool, expected: str) -> None:
        """Raise ``PassOptionError("{name}.{key} must {expected}; got {value!r}")`` unless ``ok``."""
        if not ok:
            raise PassOptionError(f"{self.name}.{key} must {expected}; got {getattr(self, key)!r}")

    def options(self) -> dict[str, Any]:
        """The current option values."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def preservation(self) -> Preservation:
        """How much of the function this pass, with these options, preserves."""
        return self.preserves

    def run(self, gm: fx.GraphModule, record: PassRecord, example_inputs: tuple[torch.Tensor, ...] | None
            ) -> fx.GraphModule:
        """Rewrite ``gm`` (in place or not) and return the result; log into ``record``."""
        raise NotImplementedError(f"pass {self.name} does not implement run()")  # abstract method

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor] | None = None) -> fx.GraphModule:
        """Apply the pass on its own (outside :func:`netsurgeon.transform`), in place."""
        return apply_pass(gm, self, example_inputs)


PassSpec = Union[str, tuple, Pass]


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator adding a pass to the registry under ``cls.name``."""
    if not cls.name:
        raise InvalidArgumentError(f"{cls.__name__} needs a non-empty class attribute 'name'")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise InvalidArgumentError(f"a pass named {cls.name!r} is registered already ({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def list_passes() -> list[str]:
    """Names of the registered passes, sorted."""
    return sorted(_REGISTRY)


def get_pass(name: str) -> type[Pass]:
    """The pass class registered as ``name``; unknown names list the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownPassError(f"unknown pass {name!r}.{hint} Valid passes: {', '.join(list_passes())}") from None


def _option_names(cls: type[Pass]) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def make_pass(spec: PassSpec) -> Pass:
    """A pass instance from a name, ``(name, {options})`` or an instance (validated again)."""
    if isinstance(spec, Pass):
        spec.validate()  # its options may have been set after construction
        return spec
    if isinstance(spec, str):
        return get_pass(spec)()
    if isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], Mapping):
        cls = get_pass(spec[0])
        valid = _option_names(cls)
        for key in spec[1]:
            if key not in valid:
                close = difflib.get_close_matches(key, valid, n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                raise PassOptionError(f"pass {cls.name!r} has no option {key!r}.{hint} "
                                      f"Valid options: {', '.join(valid) or '(none)'}")
        return cls(**spec[1])
    raise PassOptionError(f"a pass is given as a name, (name, {{options}}) or a Pass instance; got {spec!r}")


def _hint(cls: type[Pass], key: str) -> Any:
    return typing.get_type_hints(cls)[key]


def _check_value(cls: type[Pass], key: str, value: Any) -> None:
    alternatives = _alternatives(_hint(cls, key))
    if not any(_matches(value, h) for h in alternatives):
        raise PassOptionError(f"{cls.name}.{key} must be {_expected(alternatives)}; "
                              f"got {value!r} of type {type(value).__name__}")


def _alternatives(hint: Any) -> tuple:
    """The members of a ``Union[...]`` or ``X | Y`` hint; ``(hint,)`` for any other."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _literal_choices(hint: Any) -> tuple | None:
    if typing.get_origin(hint) is typing.Literal:
        return typing.get_args(hint)
    return None


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` has type ``hint``: a bool is no number, an int is a float; other hints accept all."""
    choices = _literal_choices(hint)
    if choices is not None:
        return value in choices
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint in (int, float):
        return isinstance(value, numbers.Integral if hint is int else numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True


def _expected(alternatives: tuple, typed: bool = True) -> str:
    """``alternatives`` in words, as Python values (``"an int or None"``) or, unless ``typed``,
    as command-line text (``"an int or none"``)."""
    words = _TYPE_WORDS if typed else _TEXT_WORDS
    parts = []
    for hint in alternatives:
        choices = _literal_choices(hint)
        if choices is not None:
            parts.append(f"one of {', '.join(map(repr if typed else str, choices))}")
        else:
            parts.append(words.get(hint, getattr(hint, "__name__", repr(hint))))
    return " or ".join(parts)


def _parse(text: str, hint: Any) -> Any:
    """``text`` as a value of type ``hint``; ValueError when it is not one."""
    choices = _literal_choices(hint)
    if choices is not None:
        for c in choices:
            if str(c) == text:
                return c
        raise ValueError(text)
    if hint is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if hint is type(None):
        raise ValueError(text)  # "none" and "null" are handled by coerce_option
    if hint in (int, float, str):
        return hint(text)
    return text


def coerce_option(cls: type[Pass], key: str, text: str) -> Any:
    """Convert a command-line string to the type of option ``key`` of ``cls``.

    Bools take ``true``/``false``, ``yes``/``no``, ``on``/``off``, ``1``/``0``; an
    option that may be None takes ``none`` or ``null``. Ranges are checked later,
    when the pass is made.
    """
    if key not in _option_names(cls):
        close = difflib.get_close_matches(key, _option_names(cls), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise PassOptionError(f"pass {cls.name!r} has no option {key!r}.{hint} "
                              f"Valid options: {', '.join(_option_names(cls)) or '(none)'}")
    alternatives = _alternatives(_hint(cls, key))
    if type(None) in alternatives and text.lower() in ("none", "null"):
        return None
    for hint in alternatives:
        try:
            return _parse(text, hint)
        except ValueError:
            continue
    raise PassOptionError(f"bad value {text!r} for {cls.name}.{key}: expected {_expected(alternatives, typed=False)}")
