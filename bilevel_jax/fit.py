r"""``fit``: a thin training loop around a :func:`~bilevel_jax.bilevel_step`::

    step = bj.bilevel_step(base_loss, meta_loss, base_tx, meta_tx, bj.sama())
    state = step.init(theta0, lam0)
    state, history = bj.fit(step, state, base_batches_fn, itertools.repeat(meta_batch),
                            num_meta_steps=300, eval_fn=evaluate, eval_every=30,
                            log_path="run.jsonl", checkpointer=bj.checkpoint.Checkpointer("ckpt"),
                            checkpoint_every=100, resume=True, max_skips=10)

Each meta step pulls one ``base_batches`` (K stacked base batches: every leaf has a
leading axis of length K) and one meta batch, and calls the jitted step, donating the
state. Everything else is bookkeeping on the host:

- **Asynchronous dispatch.** The metrics of step ``n`` are fetched to the host only
  after step ``n + sync_lag`` has been dispatched, so the device queue stays full; the
  progress bar, the JSON-lines log, TensorBoard and the skip check all read those
  fetched metrics (the bar's postfix lags by ``sync_lag`` steps).
- **Data position.** One meta step consumes one ``base_batches`` and one meta batch, so
  the position in the data stream is ``state.meta_steps``. ``num_meta_steps`` is the
  *total* to reach (``fit`` stops when ``state.meta_steps == num_meta_steps``), which is
  what makes an interrupted run resumable with the same call.
- **Data sources.** ``base_iter`` / ``meta_iter`` are either iterables, or *factories*:
  callables ``f(start) -> iterable`` that yield the stream from position ``start``
  (meta steps already consumed). Factories are the clean way to resume (and to restart
  cheaply); a plain iterable is assumed to start at the position of the ``state``
  passed in, and on resume ``fit`` skips it forward by ``next()``-ing the consumed
  items, which is only correct when the caller re-creates it deterministically (same
  seed, same order).
- **Checkpoints** (a :class:`bilevel_jax.checkpoint.Checkpointer`): every
  ``checkpoint_every`` meta steps, at the end, and on ``KeyboardInterrupt`` (then the
  interrupt is re-raised). The checkpoint step is ``state.meta_steps``; ``extra`` holds
  ``{"data_position", "meta_steps", "base_steps"}``. ``resume=True`` restores the newest
  usable checkpoint (falling back over corrupt ones) and truncates the JSON-lines log
  to the restored position, so that a crashed-and-resumed run leaves one line per step.
- **Safe failure.** With ``max_skips`` the run stops with
  :class:`~bilevel_jax.TooManySkipsError` once more base or meta steps than that were
  skipped as non-finite (the error carries ``.state`` and ``.history``).
- **Metric sinks.** Each log record goes to every sink (the JSON-lines file, TensorBoard,
  the tqdm bar) through one small writer interface; the sinks are closed by a
  ``contextlib.ExitStack`` however the run ends.

The state passed in is donated (with ``jit=True, donate=True``): do not use it after
the call; ``eval_fn(state)`` must not keep references to the state either.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple, cast

import jax

from bilevel_jax._nonfinite import nonfinite_errors
from bilevel_jax.loop import BilevelState, BilevelStep, TooManySkipsError, check_skips

__all__ = ["fit"]

PyTree = Any
_BOOKKEEPING = ("meta_steps", "base_steps", "elapsed_s", "eval")  # record keys that are no metric


class _SkipCounts(NamedTuple):
    skipped_base: int
    skipped_meta: int


def _scalar(x) -> float | int:
    x = jax.device_get(x)
    try:
        return x.item() if hasattr(x, "item") else float(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"fit: metrics and eval_fn results must be scalars, got {x!r}") from e


def _leading(base_batches) -> int:
    leaves = jax.tree.leaves(base_batches)
    return int(leaves[0].shape[0]) if leaves and getattr(leaves[0], "ndim", 0) else 0


def _deleted(state) -> bool:
    return any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree.leaves(state))


# -- metric sinks: one small writer interface ---------------------------------------------------
class _Writer:
    """A metric sink: ``write(record)`` once per meta step, in order; ``dispatched()`` when a
    step is launched; ``close()`` at the end (however the run ends)."""

    def write(self, record: dict) -> None:
        pass

    def dispatched(self) -> None:
        pass

    def close(self) -> None:
        pass


def _record_step(line: str) -> int:
    rec = json.loads(line)
    return rec.get("meta_steps", rec.get("meta_step", 0))  # logs written before the rename


def _truncate_log(path: str, position: int) -> None:
    """Keep the log lines of meta steps ``<= position`` (after resuming from a checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    kept = [ln for ln in lines if _record_step(ln) <= position]
    if len(kept) != len(lines):
        with open(path, "w") as f:
            f.writelines(kept)


class _JsonLines(_Writer):
    def __init__(self, path: str, resume: bool, start: int):
        if resume:
            _truncate_log(path, start)
        self.file = open(path, "a" if resume else "w")  # noqa: SIM115 - closed by close()

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()  # lines survive a hard kill; `tail -f` shows them

    def close(self) -> None:
        self.file.close()


class _TensorBoard(_Writer):
    def __init__(self, summary_writer):
        self.tb = summary_writer

    def write(self, record: dict) -> None:
        pos = record["meta_steps"]
        for k, v in record.items():
            if k not in _BOOKKEEPING:
                self.tb.add_scalar(f"train/{k}", v, pos)
        for k, v in record.get("eval", {}).items():
            self.tb.add_scalar(f"eval/{k}", v, pos)

    def close(self) -> None:
        self.tb.close()


def _tensorboard(logdir: str) -> _Writer | None:
    try:
        from tensorboardX import SummaryWriter  # type: ignore[import-not-found]
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter  # type: ignore[import-not-found]
        except ImportError:
            warnings.warn(
                "fit: tensorboard_dir was given but neither tensorboardX nor torch is installed; "
                "no TensorBoard scalars are written (the JSON-lines log has the same numbers).",
                stacklevel=4,
            )
            return None
    return _TensorBoard(SummaryWriter(logdir))


class _ProgressBar(_Writer):
    def __init__(self, bar):
        self.bar = bar

    def dispatched(self) -> None:
        self.bar.update(1)

    def write(self, record: dict) -> None:
        post = {k: f"{record[k]:.4g}" for k in ("base_loss", "meta_loss") if k in record}
        post.update({k: f"{v:.4g}" for k, v in record.get("eval", {}).items()})
        self.bar.set_postfix(post, refresh=False)

    def close(self) -> None:
        self.bar.close()


def _progress_bar(total: int | None, start: int, desc: str | None) -> _Writer | None:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return _ProgressBar(
        tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, mininterval=0.5)
    )


def _open_writers(
    stack: contextlib.ExitStack, *, log_path, tensorboard_dir, progress, resume, start, total, desc
) -> list[_Writer]:
    """The sinks asked for, each closed by ``stack``."""
    writers = []
    if log_path is not None:
        writers.append(_JsonLines(os.fspath(log_path), resume, start))
        stack.callback(writers[-1].close)
    for writer in (
        _tensorboard(os.fspath(tensorboard_dir)) if tensorboard_dir is not None else None,
        _progress_bar(total, start, desc) if progress else None,
    ):
        if writer is not None:
            writers.append(writer)
            stack.callback(writer.close)
    return writers


# -- resume / positioning -----------------------------------------------------------------------
def _open(source: Any, position: int, origin: int, name: str) -> Iterator:
    """An iterator over ``source`` positioned at meta step ``position`` (see module docstring)."""
    if callable(source) and not isinstance(source, Iterable):
        return iter(cast(Callable[[int], Iterable], source)(position))
    it = iter(source)
    for i in range(position - origin):  # re-created plain iterable: skip what was consumed
        try:
            next(it)
        except StopIteration:
            raise ValueError(
                f"fit: cannot resume {name} at position {position}: it ran out after "
                f"{origin + i} items"
            ) from None
    return it


def _restore(state: BilevelState, checkpointer, resume: bool) -> tuple[BilevelState, int | None]:
    """The state to start from and the meta step of its checkpoint (None: not saved yet)."""
    if not resume:
        if checkpointer is not None and checkpointer.latest_step() is not None:
            raise ValueError(
                f"fit: {checkpointer.directory} already holds checkpoints (newest step "
                f"{checkpointer.latest_step()}); pass resume=True to continue that run, or use "
                "a fresh directory."
            )
        return state, None
    if checkpointer.latest_step() is None:
        return state, None
    _, state, extra = checkpointer.restore(state)
    pos = int(state.meta_steps)
    if int(extra.get("data_position", pos)) != pos:
        raise ValueError(
            f"fit: checkpoint data_position {extra.get('data_position')} differs from "
            f"its state.meta_steps {pos}"
        )
    return state, pos if checkpointer.latest_step() == pos else None


def _validate(resume, checkpointer, eval_every, checkpoint_every) -> None:
    if resume and checkpointer is None:
        raise ValueError("fit: resume=True needs a checkpointer")
    for name, v in [("eval_every", eval_every), ("checkpoint_every", checkpoint_every)]:
        if v is not None and int(v) < 1:
            raise ValueError(f"fit: {name} must be a positive integer or None, got {v!r}")
    if checkpoint_every is not None and checkpointer is None:
        raise ValueError("fit: checkpoint_every needs a checkpointer")


# -- the run: dispatch, lagged metrics, evaluation, checkpoints ----------------------------------
_SKIP_STREAK = 10  # warn after this many consecutive skipped meta steps, then at each 10×


class _Run:
    """The bookkeeping of one :func:`fit` call; ``self.state`` is always the newest state."""

    def __init__(
        self, state, writers, *, start, checkpointer, last_saved, eval_fn, max_skips, per_call
    ):
        self.state, self.writers, self.pos = state, writers, start
        self.per_call = per_call  # base steps per call, or None: the batches' leading axis
        self.checkpointer, self.last_saved = checkpointer, last_saved
        self.eval_fn, self.max_skips = eval_fn, max_skips
        self.base_steps = int(state.base_steps)
        self.skipped = [int(state.skipped_base), int(state.skipped_meta)]
        self.skip_streak = 0  # consecutive skipped meta steps (warned at 10, 100, 1000, ...)
        self.pending: collections.deque = collections.deque()  # (meta, base, device metrics)
        self.history: list[dict] = []
        self.evals: dict[int, dict] = {}
        self.last_eval: int | None = None
        self.t0 = time.perf_counter()

    def dispatch(self, run, base_batches, meta_batch) -> int:
        self.state, metrics = run(self.state, base_batches, meta_batch)
        self.base_steps += _leading(base_batches) if self.per_call is None else self.per_call
        self.pos += 1
        self.pending.append((self.pos, self.base_steps, metrics))
        for w in self.writers:
            w.dispatched()
        return self.pos

    def flush(self, keep: int, check: bool = True) -> None:
        """Fetch and write the metrics of all but the newest ``keep`` dispatched steps."""
        while len(self.pending) > keep:
            pos, base_steps, metrics = self.pending[0]
            values = {k: _scalar(v) for k, v in jax.device_get(metrics).items()}
            self.pending.popleft()
            elapsed = round(time.perf_counter() - self.t0, 4)
            rec = {"meta_steps": pos, "base_steps": base_steps, **values, "elapsed_s": elapsed}
            if pos in self.evals:
                rec["eval"] = self.evals.pop(pos)
            self.history.append(rec)
            for w in self.writers:
                w.write(rec)
            self.skipped[0] += int(values.get("base_skipped", 0))
            self.skipped[1] += int(values.get("meta_skipped", 0))
            self._warn_skip_streak(int(values.get("meta_skipped", 0)), pos)
            if check:
                check_skips(_SkipCounts(*self.skipped), self.max_skips)

    def _warn_skip_streak(self, skipped: int, pos: int) -> None:
        """Warn when 10, 100, 1000, ... consecutive meta steps were skipped as non-finite."""
        self.skip_streak = self.skip_streak + 1 if skipped else 0
        n = self.skip_streak
        if n >= _SKIP_STREAK and n == _SKIP_STREAK ** round(math.log(n, _SKIP_STREAK)):
            limit = (
                "max_skips=N makes fit stop such a run (TooManySkipsError)"
                if self.max_skips is None
                else f"fit stops after {self.max_skips} skips (max_skips)"
            )
            warnings.warn(
                f"fit: the last {n} consecutive meta steps (up to meta step {pos}) were all "
                "skipped because the hypergradient or the meta update was not finite, so the "
                "meta parameters are not learning. Check the losses and data for NaN/inf, "
                "lower the learning rates, or keep the meta parameters in float32; "
                f"{limit}.",
                RuntimeWarning,
                stacklevel=5,
            )

    def evaluate(self, pos: int) -> None:
        self.evals[pos] = {k: _scalar(v) for k, v in dict(self.eval_fn(self.state)).items()}
        self.last_eval = pos

    def save(self, check: bool = True) -> None:
        pos = int(self.state.meta_steps)
        if self.checkpointer is None or pos == self.last_saved:
            return
        self.flush(keep=0, check=check)  # the log holds every step the checkpoint holds
        extra = {"data_position": pos, "meta_steps": pos, "base_steps": int(self.state.base_steps)}
        try:
            self.checkpointer.save(pos, self.state, extra)
        except KeyboardInterrupt:
            # the save was abandoned (Checkpointer cleans up) unless it had committed; the
            # interrupt checkpoint then writes this step again only when it is not on disk
            if self.checkpointer.latest_step() == pos:
                self.last_saved = pos
            raise
        self.last_saved = pos

    def interrupted(self) -> None:
        self.flush(keep=0, check=False)
        if self.checkpointer is None:
            return
        if _deleted(self.state):
            warnings.warn(
                "fit: interrupted while the step held the donated state; no checkpoint "
                f"written (the newest one is at meta step {self.last_saved}).",
                stacklevel=3,
            )
        else:
            self.save(check=False)


@nonfinite_errors()  # on_nonfinite="raise" surfaces as FloatingPointError
def _loop(r: _Run, run, base_it, meta_it, *, start, total, eval_every, checkpoint_every, sync_lag):
    """Step until ``total`` (or the data runs out), then evaluate, check and save the end."""
    pos = start
    while total is None or pos < total:
        try:
            base_batches, meta_batch = next(base_it), next(meta_it)
        except StopIteration:
            if total is not None:
                warnings.warn(
                    f"fit: the data ran out after {pos} of {total} meta steps; stopping.",
                    stacklevel=3,
                )
            break
        pos = r.dispatch(run, base_batches, meta_batch)
        if r.eval_fn is not None and ((eval_every and pos % eval_every == 0) or pos == total):
            r.evaluate(pos)
        r.flush(keep=sync_lag)
        if checkpoint_every and pos % checkpoint_every == 0:
            r.save()
    if r.eval_fn is not None and pos > start and r.last_eval != pos:
        r.evaluate(pos)  # the data ran out early: evaluate the last state too
    r.flush(keep=0)
    check_skips(r.state, r.max_skips)
    r.save()


def fit(
    step: BilevelStep | Callable,
    state: BilevelState,
    base_iter: Iterable | Callable[[int], Iterable],
    meta_iter: Iterable | Callable[[int], Iterable],
    *,
    num_meta_steps: int | None,
    jit: bool = True,
    donate: bool = True,
    eval_fn: Callable[[BilevelState], dict] | None = None,
    eval_every: int | None = None,
    log_path: str | os.PathLike | None = None,
    checkpointer: Any = None,
    checkpoint_every: int | None = None,
    resume: bool = False,
    max_skips: int | None = None,
    progress: bool = True,
    desc: str | None = None,
    tensorboard_dir: str | os.PathLike | None = None,
    sync_lag: int = 4,
) -> tuple[BilevelState, list[dict]]:
    r"""Run ``step`` until ``state.meta_steps == num_meta_steps``; returns ``(state, history)``.

    Args:
      step: a :class:`~bilevel_jax.BilevelStep` (or any ``step(state, base_batches,
        meta_batch) -> (state, metrics)`` with scalar metrics and a state with the counters
        of a :class:`BilevelState`, e.g. a :class:`~bilevel_jax.multilevel.MultilevelStep`).
        The logged ``base_steps`` advance by ``step.base_steps_per_call`` where the step has
        that attribute, else by the leading axis of the base batches.
      state: the starting state (donated). With ``resume=True`` it is the template the
        checkpoint is restored into, and is used as is when there is no checkpoint yet.
      base_iter: the K-stacked base batches: an iterable, or a factory ``f(start)`` that
        returns one positioned after ``start`` consumed meta steps (module docstring).
      meta_iter: the meta batches, likewise (``itertools.repeat(batch)`` for a fixed one).
      num_meta_steps: the total number of meta steps of the run (counted by
        ``state.meta_steps``, so a resumed call uses the same value); ``None``: until
        ``base_iter`` runs out. If the data runs out earlier, ``fit`` warns and stops.
      jit: ``jax.jit`` the step (``False`` runs it eagerly, for debugging).
      donate: donate the state to the jitted step (no copy of θ, λ and the optimizer states).
      eval_fn: ``eval_fn(state) -> {name: scalar}``, called every ``eval_every`` meta steps
        and after the last one; its values go into that step's log line under ``"eval"``.
      eval_every: meta steps between evaluations (``None``: only at the end).
      log_path: write one JSON line per meta step: ``meta_steps``, ``base_steps`` (the
        counts after that step), the step's metrics, ``elapsed_s`` (host time when the
        metrics were fetched) and ``eval`` when evaluated. Non-finite floats are written as
        ``NaN``/``Infinity`` (Python's ``json`` reads them back). A fresh run overwrites the
        file; a resumed one appends after dropping lines past the restored position.
      checkpointer: a :class:`bilevel_jax.checkpoint.Checkpointer` (``save(step, state,
        extra)``, ``restore(template)``, ``latest_step()``); checkpoints are written every
        ``checkpoint_every`` meta steps, after the last step, and on ``KeyboardInterrupt``.
        A fresh run (``resume=False``) refuses a directory that already holds checkpoints.
      checkpoint_every: meta steps between checkpoints (``None``: only at the end and on
        interrupt).
      resume: restore the newest usable checkpoint of ``checkpointer`` (if any) and go on
        from its data position.
      max_skips: stop with :class:`~bilevel_jax.TooManySkipsError` once more than this many
        base or meta steps were skipped as non-finite (:func:`~bilevel_jax.check_skips`);
        detected at most ``sync_lag`` steps late. The error has ``.state`` and ``.history``.
      progress: show a tqdm bar (if tqdm is installed) with the latest metrics.
      desc: the bar's label.
      tensorboard_dir: also write the scalars there, if ``tensorboardX`` or
        ``torch.utils.tensorboard`` can be imported (otherwise a warning; no dependency).
      sync_lag: how many steps behind the dispatch the metrics are fetched (at least 1).

    Returns:
      ``(state, history)``: the final state and the list of this call's log records (the
      same dicts as the JSON lines).

    Raises:
      TooManySkipsError: see ``max_skips``.
      KeyboardInterrupt: re-raised after the pending log lines are written and, with a
        checkpointer, the current state is saved (unless the interrupt hit the step call
        itself after the state was donated; then the previous checkpoint stands).

    >>> import itertools, jax.numpy as jnp, optax, bilevel_jax as bj
    >>> base = lambda th, lam, x: jnp.mean((th - x) ** 2) + jnp.sum(lam * th**2)
    >>> meta = lambda th, lam, x: jnp.mean((th - x) ** 2)
    >>> step = bj.bilevel_step(base, meta, optax.sgd(0.1), optax.sgd(0.1), bj.sama(0.1))
    >>> state, history = bj.fit(step, step.init(jnp.zeros(2), jnp.full(2, 0.5)),
    ...                         itertools.repeat(jnp.ones((4, 2))), itertools.repeat(jnp.ones(2)),
    ...                         num_meta_steps=5, progress=False)
    >>> int(state.meta_steps), [r["base_steps"] for r in history]
    (5, [4, 8, 12, 16, 20])
    """
    _validate(resume, checkpointer, eval_every, checkpoint_every)
    origin = int(state.meta_steps)
    state, last_saved = _restore(state, checkpointer, resume)
    start = int(state.meta_steps)
    total = None if num_meta_steps is None else int(num_meta_steps)
    base_it = _open(base_iter, start, origin, "base_iter")
    meta_it = _open(meta_iter, start, origin, "meta_iter")
    run = jax.jit(step, donate_argnums=0 if donate else ()) if jit else step
    sinks = dict(log_path=log_path, tensorboard_dir=tensorboard_dir, progress=progress)
    with contextlib.ExitStack() as stack:
        writers = _open_writers(stack, resume=resume, start=start, total=total, desc=desc, **sinks)
        r = _Run(
            state,
            writers,
            start=start,
            checkpointer=checkpointer,
            last_saved=last_saved,
            eval_fn=eval_fn,
            max_skips=max_skips,
            per_call=getattr(step, "base_steps_per_call", None),
        )
        try:
            _loop(
                r,
                run,
                base_it,
                meta_it,
                start=start,
                total=total,
                eval_every=eval_every,
                checkpoint_every=checkpoint_every,
                sync_lag=max(1, int(sync_lag)),
            )
        except KeyboardInterrupt:
            r.interrupted()
            raise
        except TooManySkipsError as e:
            r.flush(keep=0, check=False)
            e.state, e.history = r.state, r.history
            raise
        except Exception:
            with contextlib.suppress(Exception):  # best effort: log the completed steps
                r.flush(keep=0, check=False)
            raise
    return r.state, r.history
