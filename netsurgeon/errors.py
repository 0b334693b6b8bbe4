"""The one exception hierarchy of netsurgeon.

Every error a user can meet derives from :class:`NetsurgeonError`, so callers can
catch one type; each subclass names what was wrong and how to fix it.
"""
from __future__ import annotations

from typing import Sequence

__all__ = [
    "NetsurgeonError",
    "TraceError",
    "PassError",
    "UnknownPassError",
    "PassOptionError",
    "UnsupportedNodeError",
    "ModelSpecError",
    "CheckpointError",
    "RecipeError",
    "TransformError",
    "UntrustedCodeError",
    "OutputExistsError",
    "MissingAnalysisError",
    "DataNotFoundError",
    "DataFormatError",
    "InvalidArgumentError",
    "ExampleInputError",
    "UnknownNodeError",
]


class NetsurgeonError(Exception):
    """Base class of every error raised by netsurgeon."""


class TraceError(NetsurgeonError):
    """A model could not be traced with torch.fx (names module path, line and remedy)."""


class PassError(NetsurgeonError):
    """A pass failed; the message names the pass and the passes that ran before it.

    The original error is ``__cause__``; when it listed nodes (an :class:`UnsupportedNodeError`),
    its ``nodes`` and ``details`` are copied here, so callers read them from either.
    """

    def __init__(self, message: str, *, nodes: Sequence[str] = (), details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.nodes: tuple[str, ...] = tuple(nodes)
        self.details: tuple[str, ...] = tuple(details)


class UnknownPassError(NetsurgeonError, KeyError):
    """A pass name that is not registered (lists the valid names and the closest one)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class PassOptionError(NetsurgeonError, ValueError):
    """An option a pass does not have, or a value outside its valid range."""


class UnsupportedNodeError(NetsurgeonError):
    """A rewrite met nodes it cannot handle.

    The message names the first few and how many more; ``nodes`` holds every node name and
    ``details`` one ``"node: reason"`` line per node (empty when the message says it all),
    which the CLI prints with ``--verbose``.
    """

    def __init__(self, message: str, *, nodes: Sequence[str] = (), details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.nodes: tuple[str, ...] = tuple(nodes)
        self.details: tuple[str, ...] = tuple(details)


class ModelSpecError(NetsurgeonError, ValueError):
    """A model name or ``package.module:factory`` spec that cannot be resolved."""


class CheckpointError(NetsurgeonError):
    """A checkpoint that cannot be read or does not match the model."""


class RecipeError(CheckpointError, ValueError):
    """A ``recipe.json`` field that is missing, of the wrong type or out of range (names the field)."""


class UntrustedCodeError(CheckpointError):
    """Loading would import a module, call a factory or read a file named by data; refused unless the
    caller opts in with ``trust_code=True`` (CLI ``--trust-code``)."""


class TransformError(NetsurgeonError, ValueError):
    """No activation-transform constants (DKS/TAT) satisfy the conditions for this activation; the
    message says which condition, and that the target may be unachievable for this architecture."""


class OutputExistsError(NetsurgeonError, FileExistsError):
    """An output that exists already and would be overwritten without ``--force``."""


class MissingAnalysisError(NetsurgeonError, KeyError):
    """A node attribute read before the analysis that writes it was run."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownNodeError(MissingAnalysisError):
    """A node name that is not in the graph or the analysis (the message lists some that are)."""


class DataNotFoundError(NetsurgeonError, FileNotFoundError):
    """A dataset directory or file that does not exist (names the paths tried and the fix)."""


class DataFormatError(NetsurgeonError, ValueError):
    """A dataset file that exists but is corrupt or has unexpected content (names the file)."""


class InvalidArgumentError(NetsurgeonError, ValueError):
    """An argument outside its valid set or range (names the parameter and the valid values)."""


class ExampleInputError(NetsurgeonError, ValueError):
    """The model cannot run on the example inputs given (wrong shape, dtype or number of inputs)."""
