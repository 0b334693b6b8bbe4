"""What a pipeline of passes changed, skipped and preserved.

Example:
    >>> import timm, netsurgeon
    >>> gm = netsurgeon.transform(timm.create_model("resnet18"), ["strip_bn"])
    >>> netsurgeon.report(gm).passes[0].preservation.value
    'exact_eval'
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Preservation", "Change", "Skip", "PassRecord", "Report"]


class Preservation(str, enum.Enum):
    """How much of the model's function a pass keeps."""

    EXACT = "exact"  # same outputs in train and eval mode
    EXACT_EVAL = "exact_eval"  # same outputs in eval mode (e.g. folding batch norm)
    AT_INIT = "at_init"  # a re-initialization or structure change that is exact only at init
    NONE = "none"  # the function changes

    @property
    def text(self) -> str:
        return {"exact": "exact (train and eval)", "exact_eval": "exact in eval mode",
                "at_init": "only at initialization", "none": "not preserved"}[self.value]


_ORDER = [Preservation.EXACT, Preservation.EXACT_EVAL, Preservation.AT_INIT, Preservation.NONE]


@dataclass
class Change:
    """One edit a pass made: which node, what was done, and why."""

    node: str
    what: str
    why: str = ""


@dataclass
class Skip:
    """A node a pass left alone, and why."""

    node: str
    why: str


@dataclass
class PassRecord:
    """The record of one pass run."""

    name: str
    options: dict[str, Any]
    preservation: Preservation
    changes: list[Change] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def change(self, node: str, what: str, why: str = "") -> None:
        self.changes.append(Change(node, what, why))

    def skip(self, node: str, why: str) -> None:
        self.skipped.append(Skip(node, why))

    def note(self, text: str) -> None:
        self.notes.append(text)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": dict(self.options), "preservation": self.preservation.value,
                "changes": [c.__dict__ for c in self.changes], "skipped": [s.__dict__ for s in self.skipped],
                "notes": list(self.notes), "seconds": self.seconds}


@dataclass
class Report:
    """The report of a whole pipeline: one :class:`PassRecord` per pass, in order."""

    model: str
    passes: list[PassRecord] = field(default_factory=list)
    trace_notes: list[str] = field(default_factory=list)

    @property
    def preservation(self) -> Preservation:
        """The weakest preservation of any pass (EXACT for an empty pipeline)."""
        return max((p.preservation for p in self.passes), key=_ORDER.index, default=Preservation.EXACT)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "preservation": self.preservation.value,
                "trace_notes": list(self.trace_notes), "passes": [p.to_dict() for p in self.passes]}

    def __str__(self) -> str:
        lines = [f"netsurgeon report for {self.model}: {len(self.passes)} pass(es), function "
                 f"{self.preservation.text}"]
        lines += [f"  trace: {n}" for n in self.trace_notes]
        for p in self.passes:
            opts = ", ".join(f"{k}={v!r}" for k, v in p.options.items())
            lines.append(f"- {p.name}({opts}): {len(p.changes)} change(s), {len(p.skipped)} skipped, "
                         f"{p.preservation.text}, {p.seconds:.2f}s")
            lines += [f"    {c.node}: {c.what}" + (f" ({c.why})" if c.why else "") for c in p.changes]
            lines += [f"    skipped {s.node}: {s.why}" for s in p.skipped]
            lines += [f"    note: {n}" for n in p.notes]
        return "\n".join(lines)

    def to_markdown(self) -> str:
        out = [f"# netsurgeon report: {self.model}", "",
               f"Function preserved: **{self.preservation.text}**.", ""]
        if self.trace_notes:
            out += ["Tracing:", ""] + [f"- {n}" for n in self.trace_notes] + [""]
        for i, p in enumerate(self.passes, 1):
            opts = ", ".join(f"`{k}={v!r}`" for k, v in p.options.items()) or "defaults"
            out += [f"## {i}. `{p.name}` ({opts})", "",
                    f"Preservation: {p.preservation.text}. {len(p.changes)} change(s), "
                    f"{len(p.skipped)} skipped, {p.seconds:.2f} s.", ""]
            if p.changes:
                out += ["| node | change | why |", "|---|---|---|"]
                out += [f"| `{c.node}` | {c.what} | {c.why} |" for c in p.changes]
                out.append("")
            if p.skipped:
                out += ["| skipped node | why |", "|---|---|"]
                out += [f"| `{s.node}` | {s.why} |" for s in p.skipped]
                out.append("")
            out += [f"- {n}" for n in p.notes]
        return "\n".join(out).rstrip() + "\n"
