"""The Shakespeare character corpus for the language-model benchmarks, offline.

Reads ``shakespeare/train.txt.gz`` and ``shakespeare/test.txt.gz`` under the data root
(:func:`harness.data.data_root`: ``root=``, then ``$NETSURGEON_DATA``, then ``shared/data`` beside
the checkout), gzip UTF-8 text described in ``shared/data/shakespeare/README.md`` (public-domain
Project Gutenberg texts; the test split is three whole works held out). Nothing is downloaded and
nothing is ever written into the data directory.

The vocabulary is the sorted set of the **train** split's characters; a character of another split
that is not in it maps to one extra id, ``len(chars)`` (:class:`CharVocab`). Sequences for
next-character prediction are cut from the encoded text without overlap (:func:`char_windows`):
window ``i`` is ``x = ids[i T : i T + T]`` and ``y = ids[i T + 1 : i T + T + 1]``, so every
character but the first is a target exactly once.

Decoded text is cached in-process, keyed by path, mtime and size (a replaced file is re-read);
:func:`clear_cache` frees it. Every call returns fresh tensors.

Example:
    >>> vocab = CharVocab.from_text("abca")
    >>> vocab.chars, vocab.size, vocab.encode("cab!").tolist()   # "!" is not in the vocabulary
    ('abc', 4, [2, 0, 1, 3])
    >>> x, y = char_windows(torch.arange(10), context=4)
    >>> x.tolist(), y.tolist()
    ([[0, 1, 2, 3], [4, 5, 6, 7]], [[1, 2, 3, 4], [5, 6, 7, 8]])
"""
from __future__ import annotations

import functools
import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from netsurgeon.errors import DataFormatError, DataNotFoundError, InvalidArgumentError

from .data import ENV_VAR, data_root

__all__ = ["SPLITS", "DIRECTORY", "CharVocab", "load_text", "char_windows", "load_char_splits", "clear_cache"]

DIRECTORY = "shakespeare"
SPLITS = ("train", "test")


@dataclass(frozen=True)
class CharVocab:
    """A character vocabulary: ids ``0 .. len(chars) - 1`` in ``chars`` order, and the extra id
    ``len(chars)`` for every character not in it."""

    chars: str

    @classmethod
    def from_text(cls, text: str) -> "CharVocab":
        """The sorted set of ``text``'s characters."""
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        """Number of ids, the unknown-character id included."""
        return len(self.chars) + 1

    @property
    def unknown_id(self) -> int:
        """The id of characters outside the vocabulary."""
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """``text`` as an int64 tensor of ids."""
        table = np.full(max(map(ord, self.chars), default=0) + 1, self.unknown_id, dtype=np.int64)
        table[[ord(ch) for ch in self.chars]] = np.arange(len(self.chars))
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.where(codes < len(table), table[np.minimum(codes, len(table) - 1)], self.unknown_id)
        return torch.from_numpy(ids)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """The characters of ``ids``; the unknown id becomes U+FFFD."""
        return "".join(self.chars[i] if 0 <= i < len(self.chars) else "\ufffd" for i in torch.as_tensor(ids).tolist())


def _path(split: str, root: str | os.PathLike | None) -> Path:
    if split not in SPLITS:
        raise InvalidArgumentError(f"split={split!r} is not a split of {DIRECTORY}; valid: {list(SPLITS)}")
    path = data_root(root) / DIRECTORY / f"{split}.txt.gz"
    if not path.is_file():
        raise DataNotFoundError(f"dataset file missing: {path}\nFix: restore it (see {path.parent}/README.md and "
                                f"SHA256SUMS), or point {ENV_VAR} / root= at a complete copy.")
    return path


@functools.lru_cache(maxsize=None)
def _read(path: str, mtime_ns: int, size: int) -> str:
    try:
        with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
            return f.read()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: not a readable gzip UTF-8 text file ({e})") from e


def load_text(split: str = "train", root: str | os.PathLike | None = None) -> str:
    """One split of the corpus as a string.

    Args:
        split: "train" or "test". Default: "train".
        root: data directory, resolved by :func:`harness.data.data_root`. Default: None.

    Raises:
        DataNotFoundError: the data directory or the file is missing (names it).
        DataFormatError: the file is not gzip UTF-8 text, or is empty.
        InvalidArgumentError: unknown split.
    """
    path = _path(split, root)
    st = path.stat()
    text = _read(str(path), st.st_mtime_ns, st.st_size)
    if not text:
        raise DataFormatError(f"{path}: empty text")
    return text


def char_windows(ids: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping next-character windows ``(x, y)``, each ``(N, context)``, ``N = (len(ids) - 1) // context``."""
    if context < 1:
        raise InvalidArgumentError(f"context={context} must be >= 1")
    n = (len(ids) - 1) // context
    if n < 1:
        raise InvalidArgumentError(f"{len(ids)} ids are too few for one window of context {context}")
    x = ids[:n * context].reshape(n, context).clone()
    y = ids[1:n * context + 1].reshape(n, context).clone()
    return x, y


def load_char_splits(context: int, train_subset: int | None = None, test_subset: int | None = None,
                     root: str | os.PathLike | None = None
                     ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], CharVocab]:
    """``((x_train, y_train, x_test, y_test), vocab)``: the windows of both splits, as the benchmarks train on them.

    Args:
        context: characters per window.
        train_subset, test_subset: keep a fixed random subset of this many windows (the same one on
            every call: a permutation seeded with 0); None keeps every window.
        root: data directory. Default: None.
    """
    train = load_text("train", root)
    vocab = CharVocab.from_text(train)
    out: list[torch.Tensor] = []
    for text, n in ((train, train_subset), (load_text("test", root), test_subset)):
        x, y = char_windows(vocab.encode(text), context)
        if n is not None and n < len(x):
            idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
            x, y = x[idx], y[idx]
        out += [x, y]
    return tuple(out), vocab  # type: ignore[return-value]


def clear_cache() -> None:
    """Drop the in-process cache of decoded text."""
    _read.cache_clear()
