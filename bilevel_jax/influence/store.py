r"""A resumable on-disk store of per-example projected gradients (``bj.influence``).

Influence at scale computes each training example's projected gradient ``g_i`` (a vector of
length ``d``, e.g. ``d = Σ_layers k_in·k_out`` for LoGra's Kronecker projections) once, writes it
to disk, and scores queries against the store block by block (:mod:`bilevel_jax.influence.scoring`).
The sign and scale convention is the package's: ``influence(i, f) = g_fᵀ (H + δI)⁻¹ g_i`` with
``g_i = ∇ℓ_i(θ*)`` the gradient of example ``i``'s loss (not divided by ``n``); positive means
up-weighting example ``i`` lowers the query loss. The rows stored here are those ``g_i``
(projected).

A store is a directory holding three files::

    gradients.npy   (n, d) rows in the storage dtype (float16, bfloat16 or float32), a numpy
                    memmap (``numpy.lib.format.open_memmap``); bfloat16 is kept as its raw
                    uint16 bit pattern (the .npy format has no bfloat16) and decoded on read
    ids.npy         (n,) int64 example ids, row by row
    store.json      sidecar: format, shape, storage dtype, the caller's metadata (layer dims,
                    projection seed / basis checksum, model checksum: see :func:`tree_checksum`)
                    and ``rows_written``, the number of valid rows

**Crash safety.** :meth:`GradientStore.write` appends a block: it brings the rows to float32,
casts them once to the storage dtype, copies rows and ids into the memmaps, flushes both, and only
then rewrites ``store.json`` (a temporary file, ``fsync``, ``os.replace``). A process killed at any
point therefore leaves a sidecar whose ``rows_written`` counts rows that are fully on disk; rows
past it are ignored, and :meth:`GradientStore.open` with ``resume=True`` continues from there
(after checking the caller's metadata matches the store's, so a store of another model or another
projection is never extended). A store resumed and completed is byte-identical to one written in
one go (the rows land at the same offsets and the sidecar has no timestamps).

>>> import tempfile, numpy as np
>>> from bilevel_jax.influence.store import GradientStore
>>> with tempfile.TemporaryDirectory() as d:
...     with GradientStore.create(d, n=4, d=3, metadata={"seed": 0}) as store:
...         store.write(np.ones((2, 3)), ids=[10, 11])
...     with GradientStore.open(d, resume=True, metadata={"seed": 0}) as store:
...         store.write(np.full((2, 3), 2.0), ids=[12, 13])
...         print(store.rows_written, store.complete, store.ids.tolist())
4 True [10, 11, 12, 13]
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

__all__ = [
    "GradientStore",
    "StoreCorruptError",
    "StoreMismatchError",
    "tree_checksum",
]

_FORMAT = 1
_GRADS, _IDS, _SIDECAR = "gradients.npy", "ids.npy", "store.json"
_DTYPES = ("float16", "bfloat16", "float32")


class StoreMismatchError(ValueError):
    """A store on disk does not match what the caller expects (metadata, shape or dtype).

    Raised by :meth:`GradientStore.open` / :meth:`GradientStore.create` with ``resume=True``
    when the stored metadata (e.g. the model checksum or the projection seed) differs from the
    caller's, so that rows of two different models or projections never share one store.

    >>> import tempfile, numpy as np
    >>> from bilevel_jax.influence.store import GradientStore, StoreMismatchError
    >>> with tempfile.TemporaryDirectory() as d:
    ...     GradientStore.create(d, n=2, d=2, metadata={"model": "abc"}).close()
    ...     try:
    ...         GradientStore.open(d, resume=True, metadata={"model": "xyz"})
    ...     except StoreMismatchError as e:
    ...         print(str(e).split(": ", 2)[2].split(". It was")[0])
    metadata['model']: the store has 'abc', the caller 'xyz'
    """


class StoreCorruptError(RuntimeError):
    """A store's files are unreadable, truncated or inconsistent with its sidecar.

    >>> import os, tempfile
    >>> from bilevel_jax.influence.store import GradientStore, StoreCorruptError
    >>> with tempfile.TemporaryDirectory() as d:
    ...     GradientStore.create(d, n=8, d=4).close()
    ...     p = os.path.join(d, "gradients.npy")
    ...     os.truncate(p, os.path.getsize(p) - 8)  # lose the last row
    ...     try:
    ...         GradientStore.open(d)
    ...     except StoreCorruptError as e:
    ...         print("truncated" in str(e))
    True
    """


def _keystr(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def tree_checksum(tree: Any) -> str:
    """SHA-256 (hex) of a pytree: every leaf's path, dtype, shape and bytes, in flatten order.

    Deterministic across processes and devices (the bytes are read on the host), so it can
    identify the model a store was computed for (``tree_checksum(params)``) or the projection
    basis (``tree_checksum(projections)``) in the store's metadata. Typed PRNG keys are hashed
    through ``jax.random.key_data``. Leaves must be arrays (jax or numpy) or Python scalars.

    >>> import jax.numpy as jnp, numpy as np
    >>> from bilevel_jax.influence.store import tree_checksum
    >>> a = tree_checksum({"w": jnp.zeros(2), "b": jnp.float32(1.0)})
    >>> len(a), a == tree_checksum({"w": np.zeros(2, np.float32), "b": np.float32(1.0)})
    (64, True)
    >>> a == tree_checksum({"w": jnp.zeros(2), "b": jnp.float32(2.0)})  # a value changed
    False
    >>> a == tree_checksum({"v": jnp.zeros(2), "b": jnp.float32(1.0)})  # a name changed
    False
    """
    h = hashlib.sha256()
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            raise NotImplementedError(
                f"tree_checksum: leaf {_keystr(path)} is not fully addressable; gather it to one "
                "process first (e.g. jax.experimental.multihost_utils.process_allgather)."
            )
        dtype = getattr(x, "dtype", None)
        if dtype is not None and jax.numpy.issubdtype(dtype, jax.dtypes.prng_key):
            data = np.asarray(jax.random.key_data(x))
        elif isinstance(x, (jax.Array, np.ndarray, np.generic, bool, int, float, complex)):
            data = np.asarray(x)
        else:
            raise TypeError(
                f"tree_checksum: leaf {_keystr(path)} is a {type(x).__name__}, not an array; "
                "convert it with np.asarray or leave it out of the tree."
            )
        data = np.ascontiguousarray(data)
        dtype = data.dtype if dtype is None else dtype
        h.update(f"{_keystr(path)}|{dtype}|{tuple(data.shape)}|".encode())
        h.update(data.tobytes())
    return h.hexdigest()


def _bfloat16():
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - ml_dtypes ships with jax
        raise ValueError(
            "GradientStore: dtype='bfloat16' needs the ml_dtypes package (a dependency of jax); "
            "install it or store as float16/float32."
        ) from None
    return np.dtype(ml_dtypes.bfloat16)


def _storage_name(dtype) -> str:
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError:
            name = str(dtype)
    if name not in _DTYPES:
        raise ValueError(f"GradientStore: dtype must be one of {_DTYPES}, got {dtype!r}")
    return name


def _npy_dtype(name: str) -> np.dtype:
    """The dtype written to the .npy file (bfloat16 is stored as its uint16 bit pattern)."""
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name)


def _normalise(metadata: dict | None, what: str = "metadata") -> dict:
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict):
        raise TypeError(f"GradientStore: {what} must be a dict, got {type(metadata).__name__}")
    try:
        return json.loads(json.dumps(metadata, allow_nan=False, sort_keys=True))
    except (TypeError, ValueError) as e:
        raise TypeError(
            f"GradientStore: {what} must be JSON-able ({e}); convert numpy scalars with "
            "int()/float(), arrays with .tolist(), and pytrees of arrays with tree_checksum."
        ) from None


def _diff(stored: Any, given: Any, prefix: str = "metadata") -> list[str]:
    if isinstance(stored, dict) and isinstance(given, dict):
        out = []
        for key in sorted(set(stored) | set(given)):
            name = f"{prefix}[{key!r}]"
            if key not in given:
                out.append(f"{name} is in the store but not given by the caller")
            elif key not in stored:
                out.append(f"{name} is given by the caller but not in the store")
            else:
                out.extend(_diff(stored[key], given[key], name))
        return out
    if stored != given:
        return [f"{prefix}: the store has {stored!r}, the caller {given!r}"]
    return []


def _check_npy(path: str, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Raise StoreCorruptError unless ``path`` is a complete .npy of ``shape`` and ``dtype``."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                hshape, fortran, hdtype = np.lib.format.read_array_header_1_0(f)
            else:
                hshape, fortran, hdtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except (OSError, ValueError) as e:
        raise StoreCorruptError(f"GradientStore: cannot read the .npy header of {path}: {e}") from e
    if tuple(hshape) != shape or np.dtype(hdtype) != dtype or fortran:
        raise StoreCorruptError(
            f"GradientStore: {path} holds {np.dtype(hdtype)}{list(hshape)}"
            f"{' (Fortran order)' if fortran else ''}, but the sidecar says {dtype}{list(shape)}"
        )
    expected = offset + int(np.prod(shape)) * dtype.itemsize
    size = os.path.getsize(path)
    if size < expected:
        raise StoreCorruptError(
            f"GradientStore: {path} is truncated: {size} bytes, expected {expected} for "
            f"{dtype}{list(shape)}; the store cannot be read or resumed, write it again."
        )


class GradientStore:
    """An ``(n, d)`` array of projected gradients on disk, written in blocks and resumable.

    Create one with :meth:`create` (a fresh store, or ``resume=True`` to continue an existing
    one), open one with :meth:`open`; write blocks in row order with :meth:`write`; read float32
    blocks with :meth:`read`. Usable as a context manager (:meth:`close` on exit).

    Attributes:
      path: the store's directory.
      n, d: the array's shape (rows = training examples, columns = projected dimensions).
      dtype: the storage dtype, ``"float16"``, ``"bfloat16"`` or ``"float32"``.
      metadata: the caller's JSON metadata (a copy).
      rows_written: the number of valid rows (written and recorded in the sidecar).

    >>> import tempfile, numpy as np
    >>> from bilevel_jax.influence.store import GradientStore, tree_checksum
    >>> meta = {"model": tree_checksum({"w": np.ones(3)}), "seed": 0}
    >>> g = np.arange(15.0).reshape(5, 3) / 8
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with GradientStore.create(d, n=5, d=3, dtype="bfloat16", metadata=meta) as s:
    ...         for start in range(0, 5, 2):  # blocks of 2, the last one short
    ...             s.write(g[start : start + 2], ids=np.arange(100, 105)[start : start + 2])
    ...     s = GradientStore.open(d)
    ...     block, ids = s.read(1, 3), s.ids
    >>> block.dtype, block.tolist(), ids.tolist()
    (dtype('float32'), [[0.375, 0.5, 0.625], [0.75, 0.875, 1.0]], [100, 101, 102, 103, 104])
    """

    def __init__(self, path: str, sidecar: dict, *, writable: bool):
        """Use :meth:`create` or :meth:`open`."""
        self.path = path
        self.n, self.d = (int(x) for x in sidecar["shape"])
        self.dtype: str = sidecar["dtype"]
        self._metadata: dict = sidecar["metadata"]
        self.rows_written = int(sidecar["rows_written"])
        self.writable = writable
        self._decode = _bfloat16() if self.dtype == "bfloat16" else None
        mode = "r+" if writable else "r"
        self._grads: np.memmap | None = np.load(os.path.join(path, _GRADS), mmap_mode=mode)
        self._ids: np.memmap | None = np.load(os.path.join(path, _IDS), mmap_mode=mode)

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(
        cls,
        path: str | os.PathLike,
        n: int,
        d: int,
        *,
        dtype: str | Any = "float16",
        metadata: dict | None = None,
        resume: bool = False,
        overwrite: bool = False,
    ) -> GradientStore:
        """A new, empty store of ``n`` rows of length ``d`` in ``path`` (a directory).

        Args:
          path: the directory (created if missing).
          n: the number of rows (training examples).
          d: the row length (projected dimensions).
          dtype: the storage dtype: ``"float16"`` (default; |values| must stay below 65504),
            ``"bfloat16"`` (float32's range, 8 bits of mantissa) or ``"float32"``.
          metadata: a JSON-able dict recorded in the sidecar and checked on resume: layer dims,
            projection seed or ``tree_checksum(projections)``, ``tree_checksum(params)``, ...
          resume: if a store already exists in ``path``, open it for appending (as
            ``open(path, resume=True, metadata=metadata)``) after checking that its ``n``, ``d``
            and ``dtype`` are these; writing continues at its ``rows_written``.
          overwrite: replace an existing store in ``path``.

        Raises:
          FileExistsError: a store exists in ``path`` and neither ``resume`` nor ``overwrite``.
          StoreMismatchError: ``resume`` and the existing store differs (metadata, shape, dtype).

        >>> import tempfile
        >>> from bilevel_jax.influence.store import GradientStore
        >>> with tempfile.TemporaryDirectory() as d:
        ...     s = GradientStore.create(d, n=10, d=4, metadata={"seed": 1})
        ...     s.close()
        ...     again = GradientStore.create(d, n=10, d=4, metadata={"seed": 1}, resume=True)
        ...     print(again.rows_written, again.dtype, again.writable)
        0 float16 True
        """
        path = os.path.abspath(os.fspath(path))
        n, d = int(n), int(d)
        if n < 1 or d < 1:
            raise ValueError(f"GradientStore.create: n and d must be positive, got n={n}, d={d}")
        if resume and overwrite:
            raise ValueError("GradientStore.create: pass resume=True or overwrite=True, not both")
        name = _storage_name(dtype)
        if name == "bfloat16":
            _bfloat16()
        metadata = _normalise(metadata)
        if os.path.exists(os.path.join(path, _SIDECAR)):
            if resume:
                store = cls.open(path, resume=True, metadata=metadata)
                problems = [
                    f"{what}: the store has {have}, the caller {want}"
                    for what, have, want in (
                        ("n", store.n, n),
                        ("d", store.d, d),
                        ("dtype", store.dtype, name),
                    )
                    if have != want
                ]
                if problems:
                    store.close()
                    raise StoreMismatchError(
                        f"GradientStore.create(resume=True): {path}: " + "; ".join(problems)
                    )
                return store
            if not overwrite:
                raise FileExistsError(
                    f"GradientStore.create: {path} already holds a store; pass resume=True to "
                    "continue it, overwrite=True to replace it, or choose another directory."
                )
        os.makedirs(path, exist_ok=True)
        for f in (_SIDECAR, _GRADS, _IDS):  # the sidecar first: no valid store while rewriting
            p = os.path.join(path, f)
            if os.path.exists(p):
                os.remove(p)
        grads = np.lib.format.open_memmap(
            os.path.join(path, _GRADS), mode="w+", dtype=_npy_dtype(name), shape=(n, d)
        )
        ids = np.lib.format.open_memmap(
            os.path.join(path, _IDS), mode="w+", dtype=np.int64, shape=(n,)
        )
        grads.flush()
        ids.flush()
        del grads, ids
        sidecar = {
            "format": _FORMAT,
            "shape": [n, d],
            "dtype": name,
            "metadata": metadata,
            "rows_written": 0,
        }
        _write_json(os.path.join(path, _SIDECAR), sidecar)
        return cls(path, sidecar, writable=True)

    @classmethod
    def open(
        cls, path: str | os.PathLike, *, resume: bool = False, metadata: dict | None = None
    ) -> GradientStore:
        """Open the store in ``path``: read-only, or for appending with ``resume=True``.

        Args:
          path: the store's directory.
          resume: open for writing; :meth:`write` continues at ``rows_written``. Requires
            ``metadata``.
          metadata: the caller's metadata; it must equal the store's (compared after a JSON
            round trip, so tuples equal lists). Optional when reading.

        Raises:
          FileNotFoundError: no store in ``path``.
          StoreCorruptError: the sidecar is unreadable, or a .npy file is truncated or does not
            match the sidecar.
          StoreMismatchError: ``metadata`` differs from the store's; the message names every
            differing key.

        >>> import tempfile, numpy as np
        >>> from bilevel_jax.influence.store import GradientStore
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with GradientStore.create(d, n=3, d=2, metadata={"seed": 0}) as s:
        ...         s.write(np.ones((1, 2)), ids=[7])
        ...     s = GradientStore.open(d, resume=True, metadata={"seed": 0})
        ...     s.write(np.zeros((2, 2)), ids=[8, 9])
        ...     print(s.rows_written, s.read(0, 3).sum())
        3 2.0
        """
        path = os.path.abspath(os.fspath(path))
        side = os.path.join(path, _SIDECAR)
        if not os.path.exists(side):
            raise FileNotFoundError(
                f"GradientStore.open: no store in {path} (no {_SIDECAR}); create one with "
                "GradientStore.create."
            )
        if resume and metadata is None:
            raise TypeError(
                "GradientStore.open(resume=True) needs the caller's metadata (model checksum, "
                "projection, ...) so that a store of another model is never extended."
            )
        try:
            with open(side) as f:
                sidecar = json.load(f)
            n, d = (int(x) for x in sidecar["shape"])
            name = sidecar["dtype"]
            rows = int(sidecar["rows_written"])
            if sidecar["format"] != _FORMAT or name not in _DTYPES or not 0 <= rows <= n:
                raise ValueError(f"format {sidecar['format']}, dtype {name!r}, {rows} of {n} rows")
            if not isinstance(sidecar["metadata"], dict):
                raise ValueError("metadata is not a dict")
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise StoreCorruptError(f"GradientStore.open: unreadable sidecar {side}: {e}") from e
        _check_npy(os.path.join(path, _GRADS), (n, d), _npy_dtype(name))
        _check_npy(os.path.join(path, _IDS), (n,), np.dtype(np.int64))
        if metadata is not None:
            problems = _diff(sidecar["metadata"], _normalise(metadata))
            if problems:
                raise StoreMismatchError(
                    f"GradientStore.open: {path}: "
                    + "; ".join(problems[:12])
                    + ". It was written for another model or projection: recompute it in a new "
                    "directory (or create(..., overwrite=True))."
                )
        return cls(path, sidecar, writable=resume)

    # ----------------------------------------------------------------- writing
    @property
    def metadata(self) -> dict:
        """The caller's metadata recorded in the sidecar (a copy)."""
        return json.loads(json.dumps(self._metadata))

    @property
    def complete(self) -> bool:
        """Whether all ``n`` rows are written."""
        return self.rows_written == self.n

    def _arrays(self) -> tuple[np.memmap, np.memmap]:
        if self._grads is None or self._ids is None:
            raise ValueError(f"GradientStore: the store in {self.path} is closed")
        return self._grads, self._ids

    def write(self, rows: Any, ids: Any) -> None:
        """Append ``rows`` (``(b, d)``, any float dtype) with their example ``ids`` (``(b,)`` ints).

        The rows are brought to float32, cast once to the storage dtype (round to nearest), and
        written at ``rows_written``; the memmaps are flushed before the sidecar's
        ``rows_written`` is advanced (atomically), so a crash never counts a partly written block.

        Raises:
          ValueError: wrong shape, more rows than ``n``, non-finite values, or values outside
            float16's range (store as bfloat16/float32 or rescale), or a read-only store.
          TypeError: ``ids`` are not integers.

        >>> import tempfile, numpy as np
        >>> from bilevel_jax.influence.store import GradientStore
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with GradientStore.create(d, n=2, d=2) as s:
        ...         try:
        ...             s.write([[1e5, 0.0]], ids=[0])
        ...         except ValueError as e:
        ...             print(str(e).split(";")[0])
        GradientStore.write: rows exceed float16's range (|value| up to 100000 > 65504)
        """
        if not self.writable:
            raise ValueError(
                f"GradientStore.write: {self.path} is open read-only; open it with "
                "GradientStore.open(path, resume=True, metadata=...) to append."
            )
        grads, id_map = self._arrays()
        block = np.asarray(rows, dtype=np.float32)
        if block.ndim != 2 or block.shape[1] != self.d:
            raise ValueError(
                f"GradientStore.write: rows must have shape (b, {self.d}), got {block.shape}"
            )
        b = block.shape[0]
        ids_arr = np.asarray(ids)
        if ids_arr.shape != (b,):
            raise ValueError(
                f"GradientStore.write: ids must have shape ({b},) (one per row), got "
                f"{ids_arr.shape}"
            )
        if b and not np.issubdtype(ids_arr.dtype, np.integer):
            raise TypeError(f"GradientStore.write: ids must be integers, got {ids_arr.dtype}")
        start = self.rows_written
        if start + b > self.n:
            raise ValueError(
                f"GradientStore.write: {b} rows at row {start} exceed the store's n={self.n}"
            )
        if b == 0:
            return
        if not np.isfinite(block).all():
            bad = int(np.flatnonzero(~np.isfinite(block).all(axis=1))[0])
            raise ValueError(
                f"GradientStore.write: row {bad} of the block (example id {int(ids_arr[bad])}) "
                "is not finite; check the model and loss before storing its gradients."
            )
        with np.errstate(over="ignore"):  # overflow to inf is reported below
            if self._decode is not None:
                cast = block.astype(self._decode)
                encoded = cast.view(np.uint16)
            else:
                cast = encoded = block.astype(_npy_dtype(self.dtype))
        if not np.isfinite(cast.astype(np.float32)).all():
            top = {"float16": 65504.0, "bfloat16": 3.38953e38, "float32": 3.40282e38}[self.dtype]
            raise ValueError(
                f"GradientStore.write: rows exceed {self.dtype}'s range (|value| up to "
                f"{float(np.abs(block).max()):.6g} > {top:.6g}); store as dtype='bfloat16' or "
                "'float32', or rescale the projections."
            )
        grads[start : start + b] = encoded
        id_map[start : start + b] = ids_arr.astype(np.int64)
        grads.flush()
        id_map.flush()
        self.rows_written = start + b
        self._write_sidecar()

    def _write_sidecar(self) -> None:
        _write_json(
            os.path.join(self.path, _SIDECAR),
            {
                "format": _FORMAT,
                "shape": [self.n, self.d],
                "dtype": self.dtype,
                "metadata": self._metadata,
                "rows_written": self.rows_written,
            },
        )

    # ----------------------------------------------------------------- reading
    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` as a float32 ``(stop - start, d)`` array (decoded from storage).

        Only written rows can be read (``0 <= start <= stop <= rows_written``).

        >>> import tempfile, numpy as np
        >>> from bilevel_jax.influence.store import GradientStore
        >>> with tempfile.TemporaryDirectory() as d:
        ...     with GradientStore.create(d, n=3, d=2, dtype="float32") as s:
        ...         s.write([[1.0, 2.0], [3.0, 4.0]], ids=[0, 1])
        ...         print(s.read(1, 2).tolist())
        [[3.0, 4.0]]
        """
        grads, _ = self._arrays()
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.rows_written:
            raise ValueError(
                f"GradientStore.read: rows {start}:{stop} are outside the {self.rows_written} "
                f"written rows (of n={self.n})"
            )
        raw = np.asarray(grads[start:stop])
        if self._decode is not None:
            return raw.view(self._decode).astype(np.float32)
        return raw.astype(np.float32)

    @property
    def ids(self) -> np.ndarray:
        """The example ids of the written rows, an int64 ``(rows_written,)`` array (a copy)."""
        _, id_map = self._arrays()
        return np.array(id_map[: self.rows_written], dtype=np.int64)

    def close(self) -> None:
        """Flush and release the memmaps (the store stays on disk). Idempotent."""
        if self._grads is not None and self.writable:
            self._grads.flush()
        if self._ids is not None and self.writable:
            self._ids.flush()
        self._grads = self._ids = None

    def __enter__(self) -> GradientStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GradientStore({self.path!r}, n={self.n}, d={self.d}, dtype={self.dtype!r}, "
            f"rows_written={self.rows_written})"
        )


def _write_json(path: str, obj: dict) -> None:
    """Write ``obj`` to ``path`` atomically: a temporary file, fsync, ``os.replace``."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, sort_keys=True, indent=1, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
