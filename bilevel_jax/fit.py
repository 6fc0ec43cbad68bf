r"""``fit``: a thin training loop around a :func:`~bilevel_jax.bilevel_step`.

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
  the position in the data stream is ``state.meta_step``. ``num_meta_steps`` is the
  *total* to reach (``fit`` stops when ``state.meta_step == num_meta_steps``), which is
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
  interrupt is re-raised). The checkpoint step is ``state.meta_step``; ``extra`` holds
  ``{"data_position", "meta_step", "base_step"}``. ``resume=True`` restores the newest
  usable checkpoint (falling back over corrupt ones) and truncates the JSON-lines log
  to the restored position, so that a crashed-and-resumed run leaves one line per step.
- **Safe failure.** With ``max_skips`` the run stops with
  :class:`~bilevel_jax.TooManySkipsError` once more base or meta steps than that were
  skipped as non-finite (the error carries ``.state`` and ``.history``).

The state passed in is donated (with ``jit=True, donate=True``): do not use it after
the call; ``eval_fn(state)`` must not keep references to the state either.
"""

from __future__ import annotations

import collections
import json
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import jax

from bilevel_jax.loop import BilevelState, BilevelStep, TooManySkipsError, check_skips

__all__ = ["fit"]

PyTree = Any


class _SkipCounts(NamedTuple):
    skipped_base: int
    skipped_meta: int


def _open(source, position: int, origin: int, name: str) -> Iterator:
    """An iterator over ``source`` positioned at meta step ``position`` (see module docstring)."""
    if callable(source) and not isinstance(source, Iterable):
        return iter(source(position))
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


def _tensorboard_writer(logdir: str):
    try:
        from tensorboardX import SummaryWriter  # type: ignore[import-not-found]
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter  # type: ignore[import-not-found]
        except ImportError:
            warnings.warn(
                "fit: tensorboard_dir was given but neither tensorboardX nor torch is installed; "
                "no TensorBoard scalars are written (the JSON-lines log has the same numbers).",
                stacklevel=3,
            )
            return None
    return SummaryWriter(logdir)


def _truncate_log(path: str, position: int) -> None:
    """Keep the log lines of meta steps ``<= position`` (after resuming from a checkpoint)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln).get("meta_step", 0) <= position]
    if len(kept) != len(lines):
        with open(path, "w") as f:
            f.writelines(kept)


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
    r"""Run ``step`` until ``state.meta_step == num_meta_steps``; returns ``(state, history)``.

    Args:
      step: a :class:`~bilevel_jax.BilevelStep` (or any ``step(state, base_batches,
        meta_batch) -> (state, metrics)`` with scalar metrics and a :class:`BilevelState`).
      state: the starting state (donated). With ``resume=True`` it is the template the
        checkpoint is restored into, and is used as is when there is no checkpoint yet.
      base_iter: the K-stacked base batches: an iterable, or a factory ``f(start)`` that
        returns one positioned after ``start`` consumed meta steps (module docstring).
      meta_iter: the meta batches, likewise (``itertools.repeat(batch)`` for a fixed one).
      num_meta_steps: the total number of meta steps of the run (counted by
        ``state.meta_step``, so a resumed call uses the same value); ``None``: until
        ``base_iter`` runs out. If the data runs out earlier, ``fit`` warns and stops.
      jit: ``jax.jit`` the step (``False`` runs it eagerly, for debugging).
      donate: donate the state to the jitted step (no copy of θ, λ and the optimizer states).
      eval_fn: ``eval_fn(state) -> {name: scalar}``, called every ``eval_every`` meta steps
        and after the last one; its values go into that step's log line under ``"eval"``.
      eval_every: meta steps between evaluations (``None``: only at the end).
      log_path: write one JSON line per meta step: ``meta_step``, ``step`` (base steps),
        the step's metrics, ``elapsed_s`` (host time when the metrics were fetched) and
        ``eval`` when evaluated. Non-finite floats are written as ``NaN``/``Infinity``
        (Python's ``json`` reads them back). A fresh run overwrites the file; a resumed
        one appends after dropping lines past the restored position.
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
    """
    if resume and checkpointer is None:
        raise ValueError("fit: resume=True needs a checkpointer")
    for name, v in [("eval_every", eval_every), ("checkpoint_every", checkpoint_every)]:
        if v is not None and int(v) < 1:
            raise ValueError(f"fit: {name} must be a positive integer or None, got {v!r}")
    if checkpoint_every is not None and checkpointer is None:
        raise ValueError("fit: checkpoint_every needs a checkpointer")
    sync_lag = max(1, int(sync_lag))

    origin = int(state.meta_step)
    if resume:
        if checkpointer.latest_step() is not None:
            _, state, extra = checkpointer.restore(state)
            if int(extra.get("data_position", int(state.meta_step))) != int(state.meta_step):
                raise ValueError(
                    f"fit: checkpoint data_position {extra.get('data_position')} differs from "
                    f"its state.meta_step {int(state.meta_step)}"
                )
    elif checkpointer is not None and checkpointer.latest_step() is not None:
        raise ValueError(
            f"fit: {checkpointer.directory} already holds checkpoints (newest step "
            f"{checkpointer.latest_step()}); pass resume=True to continue that run, or use a "
            "fresh directory."
        )
    start = int(state.meta_step)
    total = None if num_meta_steps is None else int(num_meta_steps)
    base_step = int(state.step)
    skipped = [int(state.skipped_base), int(state.skipped_meta)]
    last_saved = (
        start
        if resume and checkpointer is not None and checkpointer.latest_step() == start
        else None
    )

    base_it = _open(base_iter, start, origin, "base_iter")
    meta_it = _open(meta_iter, start, origin, "meta_iter")
    if jit:
        run = jax.jit(step, donate_argnums=0 if donate else ())
    else:
        run = step

    log = writer = bar = None
    history: list[dict] = []
    pending: collections.deque = collections.deque()  # (meta_step, base_step, metrics on device)
    evals: dict[int, dict] = {}
    t0 = time.perf_counter()

    def flush(keep: int, check: bool = True) -> None:
        while len(pending) > keep:
            pos, bstep, metrics = pending[0]
            values = {k: _scalar(v) for k, v in jax.device_get(metrics).items()}
            pending.popleft()
            rec = {
                "meta_step": pos,
                "step": bstep,
                **values,
                "elapsed_s": round(time.perf_counter() - t0, 4),
            }
            if pos in evals:
                rec["eval"] = evals.pop(pos)
            history.append(rec)
            if log is not None:
                log.write(json.dumps(rec) + "\n")
                log.flush()  # lines survive a hard kill; `tail -f` shows them
            if writer is not None:
                for k, v in values.items():
                    writer.add_scalar(f"train/{k}", v, pos)
                for k, v in rec.get("eval", {}).items():
                    writer.add_scalar(f"eval/{k}", v, pos)
            if bar is not None:
                post = {k: f"{values[k]:.4g}" for k in ("base_loss", "meta_loss") if k in values}
                post.update({k: f"{v:.4g}" for k, v in rec.get("eval", {}).items()})
                bar.set_postfix(post, refresh=False)
            skipped[0] += int(values.get("base_skipped", 0))
            skipped[1] += int(values.get("meta_skipped", 0))
            if check:
                check_skips(_SkipCounts(*skipped), max_skips)

    def save(state, check: bool = True) -> None:
        nonlocal last_saved
        pos = int(state.meta_step)
        if checkpointer is None or pos == last_saved:
            return
        flush(keep=0, check=check)  # the log holds every step the checkpoint holds
        extra = {"data_position": pos, "meta_step": pos, "base_step": int(state.step)}
        checkpointer.save(pos, state, extra)
        last_saved = pos

    last_eval = None

    def evaluate(state, pos) -> None:
        nonlocal last_eval
        evals[pos] = {k: _scalar(v) for k, v in dict(eval_fn(state)).items()}
        last_eval = pos

    pos = start
    try:
        if log_path is not None:
            log_path = os.fspath(log_path)
            if resume:
                _truncate_log(log_path, start)
            log = open(log_path, "a" if resume else "w")  # noqa: SIM115 - closed in finally
        if tensorboard_dir is not None:
            writer = _tensorboard_writer(os.fspath(tensorboard_dir))
        if progress:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                bar = tqdm(
                    total=total, initial=start, desc=desc, dynamic_ncols=True, mininterval=0.5
                )

        while total is None or pos < total:
            try:
                base_batches = next(base_it)
                meta_batch = next(meta_it)
            except StopIteration:
                if total is not None:
                    warnings.warn(
                        f"fit: the data ran out after {pos} of {total} meta steps; stopping.",
                        stacklevel=2,
                    )
                break
            state, metrics = run(state, base_batches, meta_batch)
            pos += 1
            base_step += _leading(base_batches)
            pending.append((pos, base_step, metrics))
            if bar is not None:
                bar.update(1)
            if eval_fn is not None and ((eval_every and pos % eval_every == 0) or pos == total):
                evaluate(state, pos)
            flush(keep=sync_lag)
            if checkpoint_every and pos % checkpoint_every == 0:
                save(state)
        if eval_fn is not None and pos > start and last_eval != pos:
            evaluate(state, pos)  # the data ran out early: evaluate the last state too
        flush(keep=0)
        check_skips(state, max_skips)
        save(state)
    except KeyboardInterrupt:
        flush(keep=0, check=False)
        if checkpointer is not None:
            if _deleted(state):
                warnings.warn(
                    "fit: interrupted while the step held the donated state; no checkpoint "
                    f"written (the newest one is at meta step {last_saved}).",
                    stacklevel=2,
                )
            else:
                save(state, check=False)
        raise
    except TooManySkipsError as e:
        flush(keep=0, check=False)
        e.state, e.history = state, history
        raise
    except Exception:
        try:  # best effort: log the steps that completed before the failure
            flush(keep=0, check=False)
        except Exception:  # noqa: BLE001, S110 - the original error matters more
            pass
        raise
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        if writer is not None:
            writer.close()
    return state, history
