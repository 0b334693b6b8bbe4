"""Offline image-classification datasets for CPU benchmark runs.

Reads the files described in ``shared/data/README.md``: Fashion-MNIST and MNIST
(Xiao et al. 2017, arXiv:1708.07747; LeCun et al. 1998) as the official IDX ``.gz``
files, and a CIFAR-10 subset (Krizhevsky 2009) as ``cifar10/cifar10_subset.npz``.
Nothing is downloaded and nothing is ever written into the data directory.

Images come back as NCHW floats in [0, 1]; with ``normalize=True`` each channel is
then standardized, ``x = (x - mean_c) / std_c``, with the mean and standard deviation
of the **train** split (every split uses the train statistics, so test data never leaks
into preprocessing). The statistics are exact: computed from a 256-bin histogram of
the raw uint8 pixels (see :func:`channel_stats`).

Part of the benchmark harness (``benchmarks/harness``), not of the ``netsurgeon`` package: the
benchmark scripts and the tests use it. The default data root is found from this file's place in
the checkout (:func:`data_root`).

Decoded uint8 arrays are cached in-process (``functools.lru_cache``, about 47 MB per
MNIST-style train split), keyed by file path, mtime and size, so a replaced file is
re-read; the train statistics are cached per (dataset, root). :func:`clear_cache`
frees both. Every call returns fresh
tensors, so callers may modify them in place.

Example:
    >>> x, y = load_dataset("fashion_mnist", split="test")   # doctest: +SKIP
    >>> x.shape, x.dtype, y.dtype   # doctest: +SKIP
    (torch.Size([10000, 1, 28, 28]), torch.float32, torch.int64)
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from netsurgeon.errors import DataFormatError, DataNotFoundError, InvalidArgumentError

__all__ = ["DATASETS", "DatasetSpec", "data_root", "load_dataset", "load_splits", "channel_stats",
           "verify_checksums", "clear_cache", "ENV_VAR"]

ENV_VAR = "NETSURGEON_DATA"


def _repo_default() -> Path:
    """``shared/data`` next to the checkout (``../shared/data`` from the repository root, which is
    two levels above this file's folder, ``benchmarks/harness``), or in the nearest ancestor
    directory that has one (a clone placed deeper, e.g. by CI)."""
    repo = Path(__file__).resolve().parents[2]
    for ancestor in repo.parents:
        if (ancestor / "shared" / "data").is_dir():
            return ancestor / "shared" / "data"
    return repo.parent / "shared" / "data"


_REPO_DEFAULT = _repo_default()


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives under the data root and what each split must contain."""

    directory: str
    sizes: dict[str, int]          # split -> number of examples
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int = 10


DATASETS: dict[str, DatasetSpec] = {
    "fashion_mnist": DatasetSpec("fashion-mnist", {"train": 60000, "test": 10000}, (1, 28, 28)),
    "mnist": DatasetSpec("mnist", {"train": 60000, "test": 10000}, (1, 28, 28)),
    "cifar10": DatasetSpec("cifar10", {"train": 10000, "val": 2000, "test": 1000}, (3, 32, 32)),
}
_IDX_PREFIX = {"train": "train", "test": "t10k"}
_CIFAR_FILE = "cifar10_subset.npz"


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The directory holding the datasets.

    Resolution order: the ``root`` argument, then the environment variable
    ``NETSURGEON_DATA``, then ``shared/data`` next to the repository checkout (or in the
    nearest ancestor directory that has one). The first
    one that is *given* is used; a given path that does not exist is an error, never a
    silent fall-through to the next candidate.

    Args:
        root: explicit data directory. Default: None (use the environment or the default).

    Returns:
        The resolved data directory.

    Raises:
        DataNotFoundError: the chosen directory does not exist; the message lists every
            candidate and how to fix it.
    """
    env = os.environ.get(ENV_VAR) or None
    tried = [("root= argument", root), (f"${ENV_VAR}", env), ("repository default", _REPO_DEFAULT)]
    source, chosen = next((s, Path(p)) for s, p in tried if p is not None)
    chosen = chosen.expanduser().resolve()
    if chosen.is_dir():
        return chosen
    lines = [f"  {s}: {'(not set)' if p is None else Path(p).expanduser()}"
             + (" <- used, does not exist or is not a directory" if s == source else "") for s, p in tried]
    raise DataNotFoundError(
        f"dataset directory not found: {chosen} (from {source}).\nCandidates, in order:\n" + "\n".join(lines)
        + f"\nFix: set {ENV_VAR}=/path/to/data or pass root=/path/to/data; the directory must hold "
        "fashion-mnist/, mnist/ and cifar10/ as described in shared/data/README.md.")


def _spec(name: str, split: str) -> DatasetSpec:
    if name not in DATASETS:
        raise InvalidArgumentError(f"name={name!r} is not a known dataset; valid: {sorted(DATASETS)}")
    spec = DATASETS[name]
    if split not in spec.sizes:
        raise InvalidArgumentError(f"split={split!r} is not a split of {name}; valid: {list(spec.sizes)}")
    return spec


def _require_file(path: Path) -> Path:
    if not path.is_file():
        raise DataNotFoundError(f"dataset file missing: {path}\nFix: restore it (see {path.parent.parent}/README.md "
                                f"and SHA256SUMS), or point {ENV_VAR} / root= at a complete copy.")
    return path


def _stamp(path: Path) -> tuple[str, int, int]:
    """Cache key of a file: path, modification time and size (a replaced file is re-read)."""
    st = path.stat()
    return str(path), st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=None)
def _read_idx(path: str, *stamp: int) -> np.ndarray:
    """Decode a gzipped IDX file (magic 0x0000 08 ndim, big-endian uint32 dims, uint8 data)."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: not a readable gzip file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataFormatError(f"{path}: bad IDX magic {raw[:4].hex()!r} (expected 000008nn: unsigned bytes)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DataFormatError(f"{path}: truncated IDX header (ndim={ndim}, {len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != int(np.prod(dims)):
        raise DataFormatError(f"{path}: IDX header says {dims} = {int(np.prod(dims))} bytes of data, "
                              f"file has {len(raw) - header}")
    arr = np.frombuffer(raw, np.uint8, offset=header).reshape(dims)
    arr.flags.writeable = False
    return arr


@functools.lru_cache(maxsize=None)
def _read_cifar(path: str, *stamp: int) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zlib.error, EOFError) as e:
        raise DataFormatError(f"{path}: not a readable .npz file ({e})") from e
    for a in arrays.values():
        a.flags.writeable = False
    return arrays


def _check(cond: bool, path: Path, what: str) -> None:
    if not cond:
        raise DataFormatError(f"{path}: {what}")


def _raw_split(name: str, split: str, root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Validated uint8 images (N, C, H, W) as a read-only array view and labels (N,)."""
    spec = _spec(name, split)
    n, (c, h, w) = spec.sizes[split], spec.image_shape
    folder = root / spec.directory
    if name == "cifar10":
        path = _require_file(folder / _CIFAR_FILE)
        arrays = _read_cifar(*_stamp(path))
        for key in (f"x_{split}", f"y_{split}"):
            _check(key in arrays, path, f"missing array {key!r} (has {sorted(arrays)})")
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        _check(x.shape == (n, h, w, c) and x.dtype == np.uint8, path,
               f"x_{split} is {x.shape} {x.dtype}, expected {(n, h, w, c)} uint8")
        x, y_path = x.transpose(0, 3, 1, 2), path
    else:
        prefix = _IDX_PREFIX[split]
        path = _require_file(folder / f"{prefix}-images-idx3-ubyte.gz")
        y_path = _require_file(folder / f"{prefix}-labels-idx1-ubyte.gz")
        x, y = _read_idx(*_stamp(path)), _read_idx(*_stamp(y_path))
        _check(x.shape == (n, h, w), path, f"images have shape {x.shape}, expected {(n, h, w)}")
        x = x[:, None]
    _check(y.shape == (n,), y_path, f"labels of split {split!r} have shape {y.shape}, expected {(n,)}")
    _check(int(y.max()) < spec.num_classes, y_path, f"label {int(y.max())} >= num_classes={spec.num_classes}")
    return x, y


@functools.lru_cache(maxsize=None)
def _stats(name: str, root: Path) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x, _ = _raw_split(name, "train", root)
    means, stds = [], []
    levels = np.arange(256, dtype=np.float64) / 255.0
    for ch in range(x.shape[1]):
        counts = np.bincount(np.ascontiguousarray(x[:, ch]).ravel(), minlength=256).astype(np.float64)
        p = counts / counts.sum()
        mean = float(p @ levels)
        means.append(mean)
        stds.append(float(np.sqrt(p @ (levels - mean) ** 2)))
    return tuple(means), tuple(stds)


def channel_stats(name: str, root: str | os.PathLike | None = None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of the train split in [0, 1].

    Exact: computed from the histogram of the uint8 pixel values, in float64. Cached.

    Args:
        name: "fashion_mnist", "mnist" or "cifar10".
        root: data directory, resolved by :func:`data_root`. Default: None.

    Returns:
        ``(means, stds)``, one float per channel.
    """
    _spec(name, "train")
    return _stats(name, data_root(root))


def load_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None,
                 dtype: torch.dtype = torch.float32, normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of a dataset as tensors.

    Args:
        name: "fashion_mnist", "mnist" or "cifar10".
        split: "train" or "test", or "val" for cifar10 (2000 held-out training images).
            Default: "train".
        root: data directory, resolved by :func:`data_root`. Default: None.
        dtype: floating dtype of the images. Default: torch.float32.
        normalize: standardize each channel with the train split's mean and std
            (:func:`channel_stats`); otherwise images are in [0, 1]. Default: True.

    Returns:
        ``(x, y)``: images (N, C, H, W) of ``dtype`` and int64 labels (N,) in [0, 10).

    Raises:
        DataNotFoundError: the data directory or a file is missing (names it).
        DataFormatError: a file is corrupt or has the wrong shape (names it).
        InvalidArgumentError: unknown name, split or a non-floating dtype.
    """
    _spec(name, split)
    if not dtype.is_floating_point:
        raise InvalidArgumentError(f"dtype={dtype} must be a floating dtype (e.g. torch.float32)")
    base = data_root(root)
    xr, yr = _raw_split(name, split, base)
    x = torch.from_numpy(np.array(xr, order="C")).to(dtype).div_(255)
    if normalize:
        mean, std = _stats(name, base)
        shape = (1, len(mean), 1, 1)
        x.sub_(torch.tensor(mean, dtype=dtype).view(shape)).div_(torch.tensor(std, dtype=dtype).view(shape))
    return x, torch.from_numpy(yr.astype(np.int64))


def verify_checksums(name: str, root: str | os.PathLike | None = None) -> list[Path]:
    """Check a dataset's files against ``SHA256SUMS`` in the data root.

    Args:
        name: "fashion_mnist", "mnist" or "cifar10".
        root: data directory, resolved by :func:`data_root`. Default: None.

    Returns:
        The files that were checked.

    Raises:
        DataNotFoundError: SHA256SUMS or a listed file is missing.
        DataFormatError: a file's sha256 differs from the listed one.
    """
    spec, base = _spec(name, "train"), data_root(root)
    sums = _require_file(base / "SHA256SUMS")
    checked = []
    for line in sums.read_text().splitlines():
        digest, _, rel = line.strip().partition("  ")
        if not rel.startswith(spec.directory + "/"):
            continue
        path = _require_file(base / rel)
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _check(h.hexdigest() == digest, path, f"sha256 {h.hexdigest()} differs from {digest} in {sums}")
        checked.append(path)
    _check(bool(checked), sums, f"lists no file under {spec.directory}/")
    return checked


def clear_cache() -> None:
    """Drop the in-process cache of decoded arrays and train statistics."""
    for fn in (_read_idx, _read_cifar, _stats):
        fn.cache_clear()


def load_splits(name: str, train_subset: int | None = None, test_subset: int | None = None,
                flatten: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)`` of dataset ``name``, as the benchmarks train on it.

    Args:
        name: a dataset of :data:`DATASETS`.
        train_subset, test_subset: keep a fixed random subset of this many examples (the same
            one on every call: a permutation seeded with 0); None keeps the whole split.
        flatten: flatten each example to a vector (for MLPs).
    """
    out: list[torch.Tensor] = []
    for split, n in (("train", train_subset), ("test", test_subset)):
        x, y = load_dataset(name, split)
        if n is not None and n < len(x):
            idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]
            x, y = x[idx], y[idx]
        out += [x.flatten(1) if flatten else x, y]
    return tuple(out)  # type: ignore[return-value]
