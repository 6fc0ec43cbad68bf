r"""Checkpoints of a whole training state with orbax, verified on restore::

    ckpt = bj.checkpoint.Checkpointer("/tmp/run", max_to_keep=3)
    ckpt.save(step, state, extra={"data_position": pos, "rng_seed": 0})
    ...
    if ckpt.latest_step() is not None:
        step, state, extra = ckpt.restore(template=state)   # newest usable checkpoint

``state`` is any pytree of arrays (``NamedTuple``\ s, dicts, optax states,
``int32`` counters, ``uint32`` ``jax.random.PRNGKey``\ s and typed
``jax.random.key``\ s); ``extra`` is a JSON-able dict (data position, seeds,
config). Each checkpoint is one orbax step directory holding two items:

- ``state``: the arrays (``StandardSave``, tensorstore/OCDBT);
- ``meta``:  JSON with ``extra``, the leaf paths/dtypes/shapes and a SHA-256 of
  every leaf's bytes (plus dtype and shape) in flatten order.

**Atomicity.** orbax writes a step into ``<step>.orbax-checkpoint-tmp-*`` and
renames it to ``<step>`` once every item is written (``AtomicRenameTemporaryPath``
on local filesystems; object stores use a ``commit_success.txt`` marker instead).
:meth:`Checkpointer.save` blocks until that rename is done, so a process killed
any time after ``save`` returns leaves a complete checkpoint, and one killed
during ``save`` leaves only a temporary directory that orbax ignores and removes
when the next :class:`Checkpointer` opens the directory.

**Integrity.** :meth:`Checkpointer.restore` recomputes the checksum of what it
read. With ``step=None`` a checkpoint that fails (unreadable data, missing or
unparseable metadata, checksum mismatch) is reported with a
:class:`CheckpointFallbackWarning` and the next older one is tried; if none is
usable, :class:`CheckpointCorruptError` lists every step and why it was rejected.
A template whose structure differs from the checkpoint raises
:class:`CheckpointStructureError` at once (no fallback: an older checkpoint of
the same run would not match either).

Single process only: the checksum reads every leaf on the host.
"""

from __future__ import annotations

import collections
import glob
import hashlib
import json
import os
import shutil
import threading
import time
import warnings
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "CheckpointCorruptError",
    "CheckpointFallbackWarning",
    "CheckpointStructureError",
    "Checkpointer",
    "Restored",
    "state_checksum",
]

PyTree = Any

_FORMAT = 1
_STATE, _META = "state", "meta"


class CheckpointCorruptError(RuntimeError):
    """A checkpoint (or every checkpoint) in the directory is unusable.

    >>> import os, shutil, tempfile
    >>> import jax.numpy as jnp
    >>> from bilevel_jax.checkpoint import CheckpointCorruptError, Checkpointer
    >>> state = {"w": jnp.ones(2)}
    >>> with tempfile.TemporaryDirectory() as d, Checkpointer(d) as ckpt:
    ...     ckpt.save(5, state)
    ...     shutil.rmtree(os.path.join(d, "5", "meta"))  # lose the checksums
    ...     try:
    ...         ckpt.restore(template=state, step=5)
    ...     except CheckpointCorruptError as e:
    ...         print("unusable:", "metadata unreadable" in str(e))
    unusable: True
    """


class CheckpointStructureError(ValueError):
    """The restore template does not match the structure, dtypes or shapes on disk.

    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> from bilevel_jax.checkpoint import CheckpointStructureError, Checkpointer
    >>> with tempfile.TemporaryDirectory() as d, Checkpointer(d) as ckpt:
    ...     ckpt.save(0, {"w": jnp.ones(2)})
    ...     try:
    ...         ckpt.restore(template={"w": jnp.ones(3)})
    ...     except CheckpointStructureError as e:
    ...         print(str(e).split("checkpoint 0 in ")[1].split(": ", 1)[1])
    leaf ['w']: template float32[3], checkpoint float32[2]
    """


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint was unusable and an older one was restored instead.

    >>> import os, shutil, tempfile, warnings
    >>> import jax.numpy as jnp
    >>> from bilevel_jax.checkpoint import CheckpointFallbackWarning, Checkpointer
    >>> state = {"w": jnp.ones(2)}
    >>> with tempfile.TemporaryDirectory() as d, Checkpointer(d) as ckpt:
    ...     ckpt.save(1, state)
    ...     ckpt.save(2, state)
    ...     shutil.rmtree(os.path.join(d, "2", "meta"))  # step 2 is now unusable
    ...     with warnings.catch_warnings(record=True) as caught:
    ...         warnings.simplefilter("always")
    ...         restored = ckpt.restore(template=state)
    >>> restored.step, {w.category.__name__ for w in caught}
    (1, {'CheckpointFallbackWarning'})
    """


class Restored(NamedTuple):
    """Result of :meth:`Checkpointer.restore`; unpacks as ``step, state, extra``.

    Attributes:
      step: the step that was restored (older than the newest one after a fallback).
      state: the state, in the structure, dtypes and shapes of the template.
      extra: the ``extra`` dict given to :meth:`Checkpointer.save` (``{}`` if none).

    >>> from bilevel_jax.checkpoint import Restored
    >>> step, state, extra = Restored(3, {"w": 1.0}, {"data_position": 96})
    >>> step, extra["data_position"]
    (3, 96)
    """

    step: int
    state: PyTree
    extra: dict


def _keystr(path) -> str:
    return jax.tree_util.keystr(path) or "<root>"


def _is_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.numpy.issubdtype(dtype, jax.dtypes.prng_key)


def _leaf_specs(tree: PyTree) -> list[list]:
    """``[path, dtype, shape]`` for every leaf, in flatten order (JSON-able)."""
    specs = []
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not hasattr(x, "dtype") or not hasattr(x, "shape"):
            raise TypeError(
                f"bilevel_jax.checkpoint: leaf {_keystr(path)} is a {type(x).__name__}, not an "
                "array; wrap Python scalars with jnp.asarray (e.g. jnp.int32(step)) so that "
                "their dtype is fixed, or move them to `extra`."
            )
        specs.append([_keystr(path), str(x.dtype), [int(d) for d in x.shape]])
    return specs


def state_checksum(state: PyTree) -> str:
    """SHA-256 (hex) over every leaf's dtype, shape and bytes, in flatten order.

    Typed PRNG keys are hashed through ``jax.random.key_data`` (their dtype
    string, e.g. ``key<fry>``, is hashed too). Every leaf must be fully addressable
    from this process.

    >>> import jax.numpy as jnp, numpy as np
    >>> from bilevel_jax.checkpoint import state_checksum
    >>> a = state_checksum({"w": jnp.zeros(2), "t": jnp.int32(3)})
    >>> len(a), a == state_checksum({"w": np.zeros(2, np.float32), "t": np.int32(3)})
    (64, True)
    >>> a == state_checksum({"w": jnp.zeros(2), "t": jnp.int32(4)})
    False
    """
    h = hashlib.sha256()
    for path, x in jax.tree_util.tree_flatten_with_path(state)[0]:
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            raise NotImplementedError(
                f"bilevel_jax.checkpoint: leaf {_keystr(path)} is not fully addressable; "
                "checksummed checkpoints support single-process states only."
            )
        data = np.ascontiguousarray(np.asarray(jax.random.key_data(x) if _is_key(x) else x))
        h.update(f"{x.dtype}|{tuple(x.shape)}|{data.nbytes}|".encode())
        h.update(data.tobytes())
    return h.hexdigest()


def _structure_mismatch(expected: list, found: list) -> str | None:
    """Describe how the leaf specs of a template differ from those on disk."""
    exp = {p: (d, tuple(s)) for p, d, s in expected}
    got = {p: (d, tuple(s)) for p, d, s in found}
    problems = []
    missing = [p for p in got if p not in exp]
    extra = [p for p in exp if p not in got]
    if missing:
        problems.append(
            f"in the checkpoint but not the template: {', '.join(missing[:8])}"
            + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        )
    if extra:
        problems.append(
            f"in the template but not the checkpoint: {', '.join(extra[:8])}"
            + (f" (+{len(extra) - 8} more)" if len(extra) > 8 else "")
        )
    for p in exp:
        if p in got and exp[p] != got[p]:
            (de, se), (dg, sg) = exp[p], got[p]
            problems.append(f"leaf {p}: template {de}{list(se)}, checkpoint {dg}{list(sg)}")
    if not problems and [p for p, _, _ in expected] != [p for p, _, _ in found]:
        problems.append("the leaves are in a different order")
    return "; ".join(problems[:12]) or None


# BilevelState counters renamed after 0.1.0: new leaf path -> the path 0.1.0 checkpoints hold.
_RENAMED_COUNTERS = {".base_steps": ".step", ".meta_steps": ".meta_step"}


def _legacy_template(template: PyTree, expected: list, found: list) -> PyTree | None:
    """``template`` with BilevelState's 0.1.0 field names, when that is the only difference.

    Checkpoints written by bilevel_jax 0.1.0 name the counters ``step`` and ``meta_step``; orbax
    restores by field name, so they are read through a NamedTuple of the old names (same order)
    and converted back. Any other mismatch returns None (a structure error).
    """
    from bilevel_jax.loop import BilevelState  # lazy: the loop is not needed to checkpoint

    if not isinstance(template, BilevelState):
        return None
    renamed = [[_RENAMED_COUNTERS.get(p, p), d, s] for p, d, s in expected]
    if _structure_mismatch(renamed, found) is not None:
        return None
    fields = [_RENAMED_COUNTERS.get("." + f, "." + f)[1:] for f in BilevelState._fields]
    return collections.namedtuple("BilevelState", fields)(*template)


class Checkpointer:
    """Save and restore ``(state, extra)`` checkpoints in ``directory``, newest ``max_to_keep`` kept.

    Args:
      directory: where the step directories live (created if missing).
      max_to_keep: how many of the most recent checkpoints to keep on disk.

    Saves are synchronous: :meth:`save` returns once the checkpoint is committed.
    Usable as a context manager (closes the underlying orbax manager).

    >>> import tempfile
    >>> import jax.numpy as jnp
    >>> import bilevel_jax as bj
    >>> state = {"w": jnp.arange(3.0), "count": jnp.int32(7)}
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with bj.checkpoint.Checkpointer(d, max_to_keep=2) as ckpt:
    ...         for step in (10, 20, 30):
    ...             ckpt.save(step, state, extra={"data_position": step * 32})
    ...         kept = ckpt.all_steps()
    ...         step, restored, extra = ckpt.restore(template=state)
    >>> kept, step, restored["w"].tolist(), extra
    ([20, 30], 30, [0.0, 1.0, 2.0], {'data_position': 960})
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3):
        if int(max_to_keep) < 1:
            raise ValueError(f"max_to_keep must be at least 1, got {max_to_keep}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.max_to_keep = int(max_to_keep)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=self.max_to_keep,
                create=True,
                cleanup_tmp_directories=True,
                enable_async_checkpointing=False,
            ),
            item_names=(_STATE, _META),
        )
        self._rejected: dict[int, str] = {}

    # ------------------------------------------------------------------ queries
    def all_steps(self) -> list[int]:
        """All committed steps on disk, ascending (re-read from disk)."""
        self._manager.reload()
        return sorted(int(s) for s in self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest committed step on disk, or ``None``. It may still fail verification."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    # --------------------------------------------------------------------- save
    def save(
        self, step: int, state: PyTree, extra: dict | None = None, *, overwrite: bool = False
    ) -> None:
        """Write ``state`` and ``extra`` as checkpoint ``step`` and wait until it is committed.

        Args:
          step: the training step (a non-negative int); becomes the directory name.
          state: a pytree whose leaves are arrays (jax or numpy, incl. typed PRNG keys).
          extra: a JSON-able dict stored beside the state (data position, seeds, ...).
            It round-trips with JSON semantics (tuples come back as lists).
          overwrite: allow ``step`` to be at or below the newest step on disk; the
            checkpoints at ``>= step`` are deleted first (rewinding a run). Steps that
            the last :meth:`restore` rejected as corrupt are replaced without it.

        Raises:
          TypeError: ``extra`` is not JSON-able, or a leaf of ``state`` is not an array.
          ValueError: ``step`` is not newer than every checkpoint on disk and
            ``overwrite`` is False.
        """
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        extra = {} if extra is None else extra
        if not isinstance(extra, dict):
            raise TypeError(f"extra must be a dict, got {type(extra).__name__}")
        try:
            json.dumps(extra, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"bilevel_jax.checkpoint: `extra` must be JSON-able ({e}); convert numpy "
                "scalars with int()/float() and arrays with .tolist()."
            ) from None
        specs = _leaf_specs(state)
        meta = {
            "format": _FORMAT,
            "step": step,
            "extra": extra,
            "leaves": specs,
            "treedef": str(jax.tree.structure(state)),
            "sha256": state_checksum(state),
        }

        newer = [s for s in self.all_steps() if s >= step]
        known_bad = [s for s in newer if s in self._rejected]
        for s in known_bad:
            self._manager.delete(s)
        newer = [s for s in newer if s not in self._rejected]
        if newer and not overwrite:
            raise ValueError(
                f"bilevel_jax.checkpoint: cannot save step {step}: {self.directory} already has "
                f"checkpoint(s) at step(s) {newer}. Pass overwrite=True to delete them first "
                "(e.g. after restoring an older step on purpose)."
            )
        for s in newer:
            self._manager.delete(s)
        for s in known_bad:
            self._rejected.pop(s, None)

        before = set(threading.enumerate())
        try:
            saved = self._manager.save(
                step,
                args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardSave(state), _META: ocp.args.JsonSave(meta)}
                ),
                force=True,
            )
            self._manager.wait_until_finished()
        except KeyboardInterrupt:
            self._abandon(step, before)
            raise
        if not saved:  # pragma: no cover - orbax refused (read-only directory, ...)
            raise RuntimeError(
                f"bilevel_jax.checkpoint: orbax did not save step {step} in {self.directory}"
            )

    # ------------------------------------------------------------------ restore
    def _abandon(self, step: int, before: set) -> None:
        """Clean up after a ``KeyboardInterrupt`` inside orbax's save of ``step``.

        orbax writes the items in threads the saving thread joins; the interrupt stops the join,
        not the writers. Wait for the threads the save started (a second save of the same step
        would otherwise race them in the same temporary directory: the ``manifest.ocdbt.__lock``
        / zarr ``NOT_FOUND`` errors), then delete the uncommitted ``<step>.orbax-checkpoint-tmp*``
        directory and re-read the directory, so the step can be saved again (fit's interrupt
        checkpoint) and nothing stale is left. A step that was committed before the interrupt
        stays.
        """
        deadline = time.monotonic() + 120.0
        for t in set(threading.enumerate()) - before:
            # orbax's item writers (not idle pool workers, which live on and are not joined)
            if t is threading.current_thread() or t.name.startswith("ThreadPoolExecutor"):
                continue
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        for path in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
            shutil.rmtree(path, ignore_errors=True)
        self._manager.reload()

    def restore(self, template: PyTree, step: int | None = None) -> Restored:
        """Restore a checkpoint into the structure, dtypes and shapes of ``template``.

        Args:
          template: a pytree like the saved state (arrays or ``jax.ShapeDtypeStruct``\\ s;
            shardings of array leaves are reused).
          step: the step to restore; ``None`` for the newest usable one. Unusable newer
            checkpoints are skipped with a :class:`CheckpointFallbackWarning` naming the
            step and the reason.

        Returns:
          ``Restored(step, state, extra)``.

        Raises:
          FileNotFoundError: there is no checkpoint at all, or none at ``step``.
          CheckpointCorruptError: checkpoint ``step`` (or, with ``step=None``, every
            checkpoint) is unreadable, lacks its metadata or fails the checksum.
          CheckpointStructureError: the template does not match what was saved.
        """
        expected = _leaf_specs(template)
        steps = self.all_steps()
        if step is not None:
            step = int(step)
            if step not in steps:
                raise FileNotFoundError(
                    f"bilevel_jax.checkpoint: no checkpoint at step {step} in {self.directory} "
                    f"(steps on disk: {steps or 'none'})"
                )
            try:
                return self._restore_step(step, template, expected)
            except CheckpointCorruptError as e:
                self._rejected[step] = str(e)
                raise CheckpointCorruptError(
                    f"bilevel_jax.checkpoint: checkpoint at step {step} in {self.directory} is "
                    f"unusable: {e}"
                ) from e.__cause__
        if not steps:
            raise FileNotFoundError(f"bilevel_jax.checkpoint: no checkpoints in {self.directory}")
        rejected: dict[int, str] = {}
        for s in reversed(steps):
            try:
                result = self._restore_step(s, template, expected)
            except CheckpointCorruptError as e:
                rejected[s] = str(e)
                self._rejected[s] = str(e)
                warnings.warn(
                    f"bilevel_jax.checkpoint: checkpoint at step {s} in {self.directory} is "
                    f"unusable ({e}); trying an older one.",
                    CheckpointFallbackWarning,
                    stacklevel=2,
                )
                continue
            if rejected:
                warnings.warn(
                    f"bilevel_jax.checkpoint: restored step {s} instead of the newest step "
                    f"{steps[-1]} (rejected: {sorted(rejected)}).",
                    CheckpointFallbackWarning,
                    stacklevel=2,
                )
            return result
        lines = "\n".join(f"  step {s}: {why}" for s, why in sorted(rejected.items()))
        raise CheckpointCorruptError(
            f"bilevel_jax.checkpoint: no usable checkpoint in {self.directory}; rejected:\n{lines}"
        )

    def _restore_step(self, step: int, template: PyTree, expected: list) -> Restored:
        """Restore one step: CheckpointCorruptError if unusable, CheckpointStructureError on mismatch."""
        try:
            meta = self._manager.restore(
                step, args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
            )[_META]
        except Exception as e:  # noqa: BLE001 - any failure to read means unusable
            raise CheckpointCorruptError(
                f"metadata unreadable: {type(e).__name__}: {_short(e)}"
            ) from e
        if not isinstance(meta, dict) or not {"sha256", "leaves", "extra", "step"} <= meta.keys():
            raise CheckpointCorruptError(f"metadata missing or malformed (got {_short(meta)})")
        if meta["step"] != step:
            raise CheckpointCorruptError(f"metadata belongs to step {meta['step']}, not {step}")
        problem = _structure_mismatch(expected, meta["leaves"])
        legacy = _legacy_template(template, expected, meta["leaves"]) if problem else None
        if problem and legacy is None:
            raise CheckpointStructureError(
                f"bilevel_jax.checkpoint: the template does not match checkpoint {step} in "
                f"{self.directory}: {problem}"
            )
        if legacy is not None:
            warnings.warn(
                f"bilevel_jax.checkpoint: checkpoint {step} in {self.directory} was written "
                "before BilevelState's counters were renamed; its step/meta_step are read as "
                "base_steps/meta_steps (save it again to update it).",
                DeprecationWarning,
                stacklevel=3,
            )
        try:
            state = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    **{_STATE: ocp.args.StandardRestore(template if legacy is None else legacy)}
                ),
            )[_STATE]
            if legacy is not None:
                state = type(template)(*state)
        except Exception as e:  # noqa: BLE001
            raise CheckpointCorruptError(
                f"state unreadable: {type(e).__name__}: {_short(e)}"
            ) from e
        try:
            found = _leaf_specs(state)
            digest = state_checksum(state)
        except Exception as e:  # noqa: BLE001
            raise CheckpointCorruptError(
                f"restored state malformed: {type(e).__name__}: {_short(e)}"
            ) from e
        if found != expected or jax.tree.structure(state) != jax.tree.structure(template):
            raise CheckpointCorruptError(
                f"restored state does not match its metadata: {_structure_mismatch(expected, found)}"
            )
        if digest != meta["sha256"]:
            raise CheckpointCorruptError(
                f"checksum mismatch (stored sha256 {meta['sha256'][:12]}..., read {digest[:12]}...)"
            )
        return Restored(step, state, meta["extra"])

    # ---------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """Wait for pending work and release the orbax manager."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpointer({self.directory!r}, max_to_keep={self.max_to_keep})"


def _short(x, n: int = 200) -> str:
    s = str(x).replace("\n", " ")
    return s if len(s) <= n else s[: n - 3] + "..."
