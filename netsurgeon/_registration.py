"""``Registration``: what one public ``register_*`` call added, and how to take it back.

Every registry of netsurgeon (activations, op kinds, kernel rules) returns an undo
callable when an entry is added; the public calls collect them in one handle, in the
manner of ``torch.utils.hooks.RemovableHandle``. Leaving a ``with`` block, or calling
:meth:`Registration.remove`, restores exactly what was there before (an entry replaced
with ``replace=True`` comes back).

Example:
    >>> table = {}
    >>> reg = Registration("demo")
    >>> table["a"] = 1; reg.add(lambda: table.pop("a"))
    >>> with reg:
    ...     sorted(table)
    ['a']
    >>> table
    {}
"""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["Registration", "put_undoable"]


class Registration:
    """The undo steps of one registration; a context manager that removes it on exit.

    Args:
        what: a short description for ``repr`` (``"activation 'bent_relu'"``).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._undo: list[Callable[[], None]] = []
        self.removed = False

    def add(self, undo: Callable[[], None]) -> None:
        """Record one undo step (run in reverse order by :meth:`remove`)."""
        self._undo.append(undo)

    def remove(self) -> None:
        """Take the registration back, restoring what it replaced; a second call does nothing."""
        while self._undo:
            self._undo.pop()()
        self.removed = True

    def __enter__(self) -> "Registration":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"Registration({self.what}{', removed' if self.removed else ''})"


_MISSING = object()


def put_undoable(table: dict, key: Any, value: Any, on_change: Callable[[], None] | None = None
                 ) -> Callable[[], None]:
    """Set ``table[key] = value`` and return the undo step that restores the previous state;
    ``on_change`` runs after the set and after the undo (a registry's version counter)."""
    old = table.get(key, _MISSING)
    table[key] = value
    if on_change is not None:
        on_change()

    def undo() -> None:
        if old is _MISSING:
            table.pop(key, None)
        else:
            table[key] = old
        if on_change is not None:
            on_change()
    return undo
