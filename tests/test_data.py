"""harness.data (benchmarks/harness/data.py): the offline datasets, root resolution and clear errors.

The data tests (marker ``needs_data``) read ``shared/data`` beside the checkout, or
$NETSURGEON_DATA. Without it they are SKIPPED with a reason naming NETSURGEON_DATA; with
NETSURGEON_REQUIRE_DATA=1 (as in .ci/run) they FAIL instead (tests/conftest.py).
"""
from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REQUIRE_DATA_ENV, expected_data_files, require_data

import harness.data
from harness.data import DATASETS, channel_stats, data_root, load_dataset, load_splits, verify_checksums
from netsurgeon.errors import DataFormatError, DataNotFoundError, InvalidArgumentError, NetsurgeonError


@pytest.fixture(scope="module")
def root() -> Path:
    return require_data()


@pytest.mark.needs_data
@pytest.mark.parametrize("name", sorted(DATASETS))
def test_test_split_shapes_dtypes_labels_and_standardization(root, name):
    spec = DATASETS[name]
    x, y = load_dataset(name, "test")
    assert x.shape == (spec.sizes["test"], *spec.image_shape) and x.dtype == torch.float32
    assert y.shape == (spec.sizes["test"],) and y.dtype == torch.int64
    assert int(y.min()) == 0 and int(y.max()) == 9 and len(y.unique()) == 10
    # standardized with the TRAIN statistics: the test split is close to, not exactly, N(0, 1)
    mean, std = x.mean((0, 2, 3)), x.std((0, 2, 3))
    assert mean.abs().max() < 0.05 and (std - 1).abs().max() < 0.05, (mean, std)
    raw, y2 = load_dataset(name, "test", normalize=False)
    assert float(raw.min()) == 0.0 and float(raw.max()) == 1.0 and torch.equal(y, y2)
    m, s = channel_stats(name)
    torch.testing.assert_close(raw, x * torch.tensor(s).view(1, -1, 1, 1) + torch.tensor(m).view(1, -1, 1, 1),
                               rtol=0, atol=1e-5)


@pytest.mark.needs_data
def test_train_statistics_match_the_published_values(root):
    assert np.allclose(channel_stats("fashion_mnist"), ((0.2860,), (0.3530,)), rtol=0, atol=1e-4)
    assert np.allclose(channel_stats("mnist"), ((0.1307,), (0.3081,)), rtol=0, atol=1e-4)
    # data_batch_1 only: within 0.005 of the full CIFAR-10 train set's statistics
    m, s = channel_stats("cifar10")
    assert np.allclose(m, (0.4914, 0.4822, 0.4465), atol=5e-3) and np.allclose(s, (0.2470, 0.2435, 0.2616), atol=5e-3)
    x, y = load_dataset("cifar10", "train")
    assert x.shape == (10000, 3, 32, 32)
    torch.testing.assert_close(x.mean((0, 2, 3)), torch.zeros(3), rtol=0, atol=1e-4)
    torch.testing.assert_close(x.std((0, 2, 3)), torch.ones(3), rtol=0, atol=1e-4)


@pytest.mark.needs_data
def test_cifar_val_split_dtype_and_fresh_tensors(root):
    x, y = load_dataset("cifar10", "val", dtype=torch.float64)
    assert x.shape == (2000, 3, 32, 32) and x.dtype == torch.float64 and y.shape == (2000,)
    x.zero_()  # returned tensors are copies: the cache is untouched
    assert float(load_dataset("cifar10", "val")[0].abs().sum()) > 0


def test_bad_names_splits_and_dtypes_are_named():  # checked before any file is read
    with pytest.raises(InvalidArgumentError, match="valid.*fashion_mnist"):
        load_dataset("fmnist")
    with pytest.raises(InvalidArgumentError, match="split='val'.*'train', 'test'"):
        load_dataset("mnist", "val")
    with pytest.raises(InvalidArgumentError, match="floating"):
        load_dataset("mnist", "test", dtype=torch.int64)


def test_missing_root_gives_a_helpful_error(tmp_path, monkeypatch):
    monkeypatch.delenv("NETSURGEON_DATA", raising=False)
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("mnist", "test", root=tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "root= argument" in msg and "NETSURGEON_DATA" in msg
    assert isinstance(e.value, NetsurgeonError) and isinstance(e.value, FileNotFoundError)
    monkeypatch.setenv("NETSURGEON_DATA", str(tmp_path / "env-nowhere"))
    with pytest.raises(DataNotFoundError, match=r"(?s)env-nowhere \(from \$NETSURGEON_DATA\).*Fix: set"):
        data_root()


def test_repository_default_is_shared_data_next_to_the_checkout(monkeypatch):
    monkeypatch.delenv("NETSURGEON_DATA", raising=False)
    import harness.data
    assert harness.data._REPO_DEFAULT == Path(harness.data.__file__).resolve().parents[3] / "shared" / "data"


def _mnist_test_copy(root: Path, dest: Path) -> Path:
    (dest / "mnist").mkdir(parents=True)
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(root / "mnist" / f, dest / "mnist" / f)
    return dest


@pytest.mark.needs_data
def test_env_var_is_honoured_and_root_argument_wins(root, tmp_path, monkeypatch):
    copy = _mnist_test_copy(root, tmp_path / "copy")
    monkeypatch.setenv("NETSURGEON_DATA", str(copy))
    assert data_root() == copy.resolve()
    x, y = load_dataset("mnist", "test", normalize=False)
    x_ref, y_ref = load_dataset("mnist", "test", root=root, normalize=False)
    assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    # normalizing needs the train split, which the copy lacks: the error names the file
    with pytest.raises(DataNotFoundError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", "test")
    assert data_root(root) == root  # an explicit root beats the environment


def _write_idx(path: Path, header: bytes, body: bytes) -> None:
    with gzip.open(path, "wb") as f:
        f.write(header + body)


@pytest.mark.needs_data
def test_corrupt_files_are_named(root, tmp_path):
    base = _mnist_test_copy(root, tmp_path / "bad")
    labels = base / "mnist" / "t10k-labels-idx1-ubyte.gz"
    _write_idx(labels, b"\x00\x00\x0d\x01" + struct.pack(">I", 10000), bytes(40000))  # float32, not ubyte
    with pytest.raises(DataFormatError, match="t10k-labels-idx1-ubyte.gz: bad IDX magic"):
        load_dataset("mnist", "test", root=base, normalize=False)
    _write_idx(labels, b"\x00\x00\x08\x01" + struct.pack(">I", 10000), bytes(9999))  # truncated data
    with pytest.raises(DataFormatError, match="header says"):
        load_dataset("mnist", "test", root=base, normalize=False)
    _write_idx(labels, b"\x00\x00\x08\x02" + struct.pack(">II", 10000, 1), bytes(10000))  # 2-d labels
    with pytest.raises(DataFormatError, match=r"labels of split 'test' have shape \(10000, 1\)"):
        load_dataset("mnist", "test", root=base, normalize=False)
    _write_idx(labels, b"\x00\x00\x08\x01" + struct.pack(">I", 5), bytes(5))  # wrong size
    with pytest.raises(DataFormatError, match=r"labels of split 'test' have shape \(5,\), expected \(10000,\)"):
        load_dataset("mnist", "test", root=base, normalize=False)
    labels.write_bytes(b"not gzip at all")
    with pytest.raises(DataFormatError, match="not a readable gzip"):
        load_dataset("mnist", "test", root=base, normalize=False)
    images = base / "mnist" / "t10k-images-idx3-ubyte.gz"
    images.unlink()
    with pytest.raises(DataNotFoundError, match="dataset file missing: .*t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", "test", root=base, normalize=False)


@pytest.mark.needs_data
def test_checksums(root, tmp_path):
    assert len(verify_checksums("mnist")) == 4
    base = tmp_path / "sums"
    _mnist_test_copy(root, base)
    shutil.copy(root / "SHA256SUMS", base / "SHA256SUMS")
    for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (base / "mnist" / f).symlink_to(root / "mnist" / f)
    (base / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"tampered")
    with pytest.raises(DataFormatError, match="t10k-labels-idx1-ubyte.gz: sha256"):
        verify_checksums("mnist", root=base)


def test_missing_data_skips_with_a_reason_unless_required(tmp_path, monkeypatch):
    """A fresh clone without the datasets: skipped, with a reason that says where the files
    were looked for and names NETSURGEON_DATA; NETSURGEON_REQUIRE_DATA=1 makes it a failure."""
    monkeypatch.delenv(REQUIRE_DATA_ENV, raising=False)
    monkeypatch.setenv("NETSURGEON_DATA", str(tmp_path / "absent"))
    with pytest.raises(pytest.skip.Exception, match=r"dataset directory not found: .*absent \(from \$NETSURGEON_DATA\)"
                                                     r"; set NETSURGEON_DATA=/path/to/shared/data"):
        require_data()
    (tmp_path / "empty").mkdir()  # the directory exists but holds no dataset
    monkeypatch.setenv("NETSURGEON_DATA", str(tmp_path / "empty"))
    with pytest.raises(pytest.skip.Exception, match=r"dataset files not found in .*empty .*SHA256SUMS.* and \d+ more"
                                                     r"; set NETSURGEON_DATA="):
        require_data()
    # no NETSURGEON_DATA and no shared/data beside the checkout (a fresh clone on its own)
    monkeypatch.delenv("NETSURGEON_DATA")
    monkeypatch.setattr(harness.data, "_REPO_DEFAULT", tmp_path / "clone-parent" / "shared" / "data")
    with pytest.raises(pytest.skip.Exception,
                       match=r"clone-parent.*\$NETSURGEON_DATA is not set\); set NETSURGEON_DATA"):
        require_data()
    for value in ("1", "true", "YES"):
        monkeypatch.setenv(REQUIRE_DATA_ENV, value)
        with pytest.raises(pytest.fail.Exception, match=r"NETSURGEON_REQUIRE_DATA=1 and dataset directory not found"):
            require_data()
    monkeypatch.setenv(REQUIRE_DATA_ENV, "0")
    with pytest.raises(pytest.skip.Exception):
        require_data()


@pytest.mark.needs_data
def test_partial_data_copy_is_missing_data(root, tmp_path, monkeypatch):
    """A copy that lacks one of the files the tests read counts as missing (named in the reason)."""
    monkeypatch.delenv(REQUIRE_DATA_ENV, raising=False)
    copy = tmp_path / "partial"
    for rel in expected_data_files():
        (copy / rel).parent.mkdir(parents=True, exist_ok=True)
        (copy / rel).symlink_to(root / rel)
    monkeypatch.setenv("NETSURGEON_DATA", str(copy))
    assert require_data() == copy.resolve()
    (copy / "cifar10" / "cifar10_subset.npz").unlink()
    with pytest.raises(pytest.skip.Exception, match=r"dataset files not found in .*partial .*: "
                                                     r"cifar10/cifar10_subset.npz; set NETSURGEON_DATA"):
        require_data()


@pytest.mark.needs_data
def test_load_splits_draws_the_same_fixed_subsets(root):
    """The benchmarks' loader: fixed subsets (identical on every call, drawn from the full split)."""
    x, y, xt, yt = load_splits("fashion_mnist", 300, 100, flatten=True)
    assert x.shape == (300, 784) and xt.shape == (100, 784) and y.shape == (300,) and yt.shape == (100,)
    again = load_splits("fashion_mnist", 300, 100, flatten=True)
    assert all(torch.equal(a, b) for a, b in zip((x, y, xt, yt), again))
    full_x, full_y = load_dataset("fashion_mnist", "test")
    idx = torch.randperm(len(full_x), generator=torch.Generator().manual_seed(0))[:100]
    assert torch.equal(xt, full_x[idx].flatten(1)) and torch.equal(yt, full_y[idx])
    cx, _, cxt, _ = load_splits("cifar10", 50, None)
    assert cx.shape == (50, 3, 32, 32) and len(cxt) == len(load_dataset("cifar10", "test")[0])
