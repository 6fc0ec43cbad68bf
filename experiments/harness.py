"""The experiment harness: one command line, provenance and result writing for every study.

Every study (``python -m experiments.<study>``) builds its command line with :class:`StudyCLI`,
so the shared flags mean the same everywhere:

``--json PATH``
    where the result JSON goes (default ``experiments/results/<study>.json``, or
    ``experiments/results/quick/<study>.json`` with ``--quick``, which git ignores). The PNG and
    the per-step metrics (``<stem>.metrics.jsonl``) are written beside it.
``--quick``
    a short smoke-test run of the same code (what the tests run).
``--seeds N [N ...]``
    the seeds to run (split, initialisation, batch order, as the study says).
``--base-steps N``
    **base steps**: optimizer steps of θ (the base parameters) in one training run.
``--meta-steps N``
    **meta steps**: updates of λ (the meta parameters) in one training run.
``--no-progress``
    no progress bars.

A study for which a flag means nothing still accepts it in ``--help`` (saying why it does not
apply) and rejects it with a clear message when given. Where a study takes a fixed number ``K`` of
base steps per meta step, either step flag fixes the other (``base = warm-up + K · meta``) and
giving both requires them to agree.

Each run records its :func:`provenance` (git commit and dirty flag, package versions, device, the
data files read with their sha256, the exact command line), and :meth:`Run.finish` writes the
result once: JSON, PNG and JSON lines.

The module also holds the training pieces several studies share: :func:`batch_indices`,
:func:`plain_segment` and :func:`bilevel_segment` (jitted runs of :func:`bilevel_jax.base_step`
and of a bilevel step) and :func:`summarize`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

__all__ = [
    "ROOT",
    "RESULTS",
    "PACKAGES",
    "Unused",
    "StudyCLI",
    "Recipe",
    "Run",
    "provenance",
    "to_json",
    "compile_stats",
    "per_step_records",
    "batch_indices",
    "plain_segment",
    "bilevel_segment",
    "summarize",
]

ROOT = pathlib.Path(__file__).resolve().parents[1]
"""The repository root."""

RESULTS = ROOT / "experiments" / "results"
"""Where the studies' results are committed (``--quick`` results go to ``RESULTS / "quick"``)."""

PACKAGES = ("jax", "jaxlib", "optax", "flax", "chex", "orbax-checkpoint", "numpy")
"""Distributions whose versions every result records (plus the Python version)."""


# ----------------------------------------------------------------------------------------------
# Command line


@dataclasses.dataclass(frozen=True)
class Unused:
    """A shared flag that this study does not use, and why (shown in --help, and as the error)."""

    reason: str


_DEFINITIONS = """\
shared flags (the same in every study):
  base steps = optimizer steps of θ (the base parameters) in one training run;
  meta steps = updates of λ (the meta parameters) in one training run.
  A flag marked "not used" is rejected with its reason when given."""


class StudyCLI:
    """The command line of one study: the shared flags plus the study's own.

    Args:
      study: the module name under ``experiments`` (``python -m experiments.<study>``).
      doc: the study's docstring; its first paragraph is the description.
      quick: what ``--quick`` does in this study.
      seeds: what the seeds select and their default, or :class:`Unused`.
      base_steps: what ``--base-steps`` counts here and its default, or :class:`Unused`.
      meta_steps: what ``--meta-steps`` counts here and its default, or :class:`Unused`.
    """

    def __init__(
        self,
        study: str,
        doc: str | None,
        *,
        quick: str,
        seeds: str | Unused,
        base_steps: str | Unused,
        meta_steps: str | Unused,
    ):
        self.study = study
        self.parser = argparse.ArgumentParser(
            prog=f"python -m experiments.{study}",
            description=(doc or study).strip().split("\n\n")[0],
            epilog=_DEFINITIONS,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        self.unused: dict[str, str] = {}
        p = self.parser
        p.add_argument(
            "--json",
            default=None,
            metavar="PATH",
            help=f"result JSON (default {_rel(RESULTS / (study + '.json'))}; with --quick "
            f"{_rel(RESULTS / 'quick' / (study + '.json'))}); the PNG and <stem>.metrics.jsonl "
            "are written beside it",
        )
        p.add_argument("--quick", action="store_true", help=quick)
        p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
        for flag, meaning, kw in (
            ("--seeds", seeds, {"type": int, "nargs": "+", "metavar": "N"}),
            ("--base-steps", base_steps, {"type": int, "metavar": "N"}),
            ("--meta-steps", meta_steps, {"type": int, "metavar": "N"}),
        ):
            if isinstance(meaning, Unused):
                self.unused[flag] = meaning.reason
                meaning = f"not used by this study: {meaning.reason}"
            p.add_argument(flag, default=None, help=meaning, **kw)
        # retired spellings: say what replaced them instead of guessing
        p.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
        p.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        """A study-specific flag (``argparse.ArgumentParser.add_argument``)."""
        return self.parser.add_argument(*args, **kwargs)

    def error(self, message: str) -> None:
        """Exit with a usage error (status 2)."""
        self.parser.error(message)

    def parse(self, argv: Sequence[str] | None = None) -> argparse.Namespace:
        """Parse ``argv`` (default ``sys.argv[1:]``); resolves ``--json`` and checks the flags.

        The namespace also carries ``study`` and ``argv`` (what was parsed, for the provenance).
        """
        argv = list(sys.argv[1:] if argv is None else argv)
        args = self.parser.parse_args(argv)
        if args.steps is not None:
            self.error(
                "--steps is gone: use --base-steps N (optimizer steps of θ) or --meta-steps N "
                "(updates of λ)"
            )
        if args.seed is not None:
            self.error("--seed is gone: use --seeds N")
        for flag, reason in self.unused.items():
            if getattr(args, flag[2:].replace("-", "_")) is not None:
                self.error(f"{flag} is not used by this study: {reason}")
        for flag in ("base_steps", "meta_steps"):
            value = getattr(args, flag)
            if value is not None and value <= 0:
                self.error(f"--{flag.replace('_', '-')} must be positive, got {value}")
        if args.json is None:
            folder = RESULTS / "quick" if args.quick else RESULTS
            args.json = str(folder / f"{self.study}.json")
        # the folder may not exist yet (results/quick/ is git-ignored, so a fresh clone lacks it);
        # per-step logs are opened there before the run finishes
        pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        args.study, args.argv = self.study, argv
        return args

    def seeds(
        self, args: argparse.Namespace, default: Sequence[int] = (0, 1, 2), quick=(0,)
    ) -> list[int]:
        """The seeds to run: ``--seeds``, else ``quick`` with ``--quick``, else ``default``."""
        if args.seeds is not None:
            return list(args.seeds)
        return list(quick if args.quick else default)

    def steps(
        self,
        args: argparse.Namespace,
        *,
        per_meta: int,
        default: int,
        quick: int,
        warmup: int = 0,
    ) -> tuple[int, int]:
        """``(base steps, meta steps)`` of a study with ``per_meta`` base steps per meta step.

        ``base = warmup + per_meta · meta``. ``default`` / ``quick`` are the meta steps used when
        neither flag is given; either flag fixes the other, and both must agree.
        """
        base, meta = args.base_steps, args.meta_steps
        if base is not None:
            whole, rest = divmod(base - warmup, per_meta)
            if whole <= 0 or rest:
                self.error(
                    f"--base-steps {base}: this study takes {warmup} warm-up base steps and then "
                    f"{per_meta} base steps per meta step, so it must be {warmup} + {per_meta}·m "
                    "for a whole m ≥ 1"
                )
            if meta is not None and meta != whole:
                self.error(
                    f"--base-steps {base} and --meta-steps {meta} disagree: "
                    f"{base} base steps are {whole} meta steps here"
                )
            meta = whole
        if meta is None:
            meta = quick if args.quick else default
        return warmup + per_meta * meta, meta


def _rel(path: pathlib.Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


# ----------------------------------------------------------------------------------------------
# Provenance and results


class Recipe:
    """A constructor call kept as data: calling it builds the object, its ``repr`` is the call.

    Optimizers print no settings of their own, so a study builds them from recipes and records
    ``repr(recipe)``: ``Recipe(optax.adam, 1e-3, eps_root=1e-8)`` builds
    ``optax.adam(1e-3, eps_root=1e-8)`` and prints as ``optax.adam(0.001, eps_root=1e-08)``.
    Arguments that are recipes are built first, so a chain is a recipe of recipes:
    ``Recipe(optax.chain, Recipe(optax.add_decayed_weights, 1e-3), Recipe(optax.sgd, 0.03))``
    prints as ``optax.chain(optax.add_decayed_weights(0.001), optax.sgd(0.03))``.
    """

    def __init__(self, fn: Callable, *args: Any, **kwargs: Any):
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def __call__(self) -> Any:
        build = lambda a: a() if isinstance(a, Recipe) else a  # noqa: E731
        args = [build(a) for a in self.args]
        return self.fn(*args, **{k: build(v) for k, v in self.kwargs.items()})

    def __repr__(self) -> str:
        package = (getattr(self.fn, "__module__", None) or "").split(".")[0]
        name = f"{package}.{self.fn.__qualname__}" if package else self.fn.__qualname__
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{name}({', '.join(parts)})"


def _git(*args: str) -> str | None:
    try:
        proc = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def provenance(argv: Sequence[str], study: str, *, device: bool = True) -> dict[str, Any]:
    """What produced a result: code, packages, device and command.

    ``git_commit`` is the checkout's HEAD, ``git_dirty`` whether any tracked or untracked file
    outside ``experiments/results/`` differs from it (results written by an earlier study of the
    same checkout do not make the code dirty), ``library_dirty`` whether ``bilevel_jax/`` does. ``device`` (unless
    ``device=False``) describes JAX's default device. The data files read are added by
    :meth:`Run.data`.
    """
    status = _git("status", "--porcelain", "--", ".", ":(exclude)experiments/results")
    lib_status = _git("status", "--porcelain", "--", "bilevel_jax")
    out: dict[str, Any] = {
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "library_dirty": None if lib_status is None else bool(lib_status),
        "command": shlex.join(["python", "-m", f"experiments.{study}", *argv]),
        "argv": list(argv),
        "python": platform.python_version(),
        "packages": {name: _version(name) for name in PACKAGES},
        "cpu_count": os.cpu_count(),
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "data_files": [],
    }
    if device:
        import jax

        dev = jax.devices()[0]
        out["device"] = {
            "platform": dev.platform,
            "kind": dev.device_kind,
            "count": jax.device_count(),
            "process_count": jax.process_count(),
        }
    return out


def to_json(value: Any) -> Any:
    """``value`` made JSON-ready: the studies' own dataclasses (configs) become dicts of their
    fields, tuples lists, numpy scalars and arrays Python numbers and lists, and any other object
    its ``repr`` (so a method or an optimizer :class:`Recipe` records its settings as the object
    prints them)."""
    if (
        dataclasses.is_dataclass(value)
        and not isinstance(value, type)
        and type(value).__module__.split(".")[0] in ("experiments", "__main__")
    ):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return repr(value)


def per_step_records(result: dict) -> list[dict]:
    """One record per (method, index) from every list in each method's entry of ``result``.

    Index ``i`` of a list is the value after ``i`` meta steps (``"meta_steps": i``); a shorter
    list simply has no value at the indices past its end.
    """
    records = []
    for method, entry in result.items():
        if not isinstance(entry, dict):
            continue
        series = {k: v for k, v in entry.items() if isinstance(v, list) and v}
        if not series:
            continue
        length = max(len(v) for v in series.values())
        for i in range(length):
            values = {k: v[i] for k, v in series.items() if i < len(v)}
            records.append({"method": method, "meta_steps": i, **values})
    return records


class Run:
    """One invocation of a study: provenance taken at the start, the result written once.

    Use::

        args = cli.parse(argv)
        run = Run(args)
        ds = load(); run.data(ds.source)      # every data set read
        ...
        run.finish(result, plot)              # JSON, PNG, JSON lines
    """

    def __init__(self, args: argparse.Namespace, *, device: bool = True):
        self.args = args
        self.json_path = pathlib.Path(args.json)
        self.stem = self.json_path.with_suffix("")
        self.provenance = provenance(args.argv, args.study, device=device)
        self.t0 = time.perf_counter()

    @property
    def progress(self) -> bool:
        """Whether to show progress bars (not ``--no-progress``)."""
        return not self.args.no_progress

    def path(self, suffix: str) -> pathlib.Path:
        """A file beside the JSON: ``<stem><suffix>`` (e.g. ``".seed0.metrics.jsonl"``)."""
        return self.stem.with_name(self.stem.name + suffix)

    def data(self, source: dict) -> dict:
        """Record (and print) a data set read: its ``source`` dict (path, sha256, ...)."""
        source = dict(source)
        files = self.provenance["data_files"]
        if source not in files:
            files.append(source)
        path = source.get("path") or source.get("name")
        sha = source.get("sha256")
        if isinstance(sha, dict):  # one digest per file (all recorded): print their digest
            joined = "".join(f"{k}={v};" for k, v in sorted(sha.items()))
            sha = f"{hashlib.sha256(joined.encode()).hexdigest()} (of {len(sha)} files' sha256)"
        print(f"data: {path}  sha256={sha}", flush=True)
        return source

    def finish(
        self,
        result: dict,
        plot: Callable[[dict, str], None] | None,
        records: Iterable[dict] | None = None,
    ) -> dict:
        """Add ``quick``, ``wall_s`` and ``provenance`` to ``result``, then write it: the JSON,
        the PNG (``plot(result, path)``) and the per-step records as ``<stem>.metrics.jsonl``
        (default :func:`per_step_records` of ``result``; an empty iterable writes none)."""
        result["quick"] = bool(self.args.quick)
        result["wall_s"] = time.perf_counter() - self.t0
        result["provenance"] = self.provenance
        result = to_json(result)
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(result, indent=1) + "\n")
        written = [str(self.json_path)]
        records = per_step_records(result) if records is None else list(records)
        if records:
            jsonl = self.path(".metrics.jsonl")
            jsonl.write_text("".join(json.dumps(to_json(r)) + "\n" for r in records))
            written.append(str(jsonl))
        if plot is not None:
            png = self.path(".png")
            plot(result, str(png))
            written.append(str(png))
        print(f"wrote {', '.join(written)} ({result['wall_s']:.1f} s)", flush=True)
        return result


# ----------------------------------------------------------------------------------------------
# Training pieces shared by several studies


def batch_indices(n: int, steps: int, batch_size: int, seed: int) -> np.ndarray:
    """(steps, batch_size) example indices: consecutive epochs of fresh permutations of ``n``."""
    rng = np.random.default_rng(seed)
    per_epoch = n // batch_size
    epochs = math.ceil(steps / per_epoch)
    idx = [rng.permutation(n)[: per_epoch * batch_size] for _ in range(epochs)]
    return np.concatenate(idx).reshape(-1, batch_size)[:steps]


def plain_segment(loss_fn: Callable, tx: Any) -> Callable:
    """Jitted ``seg(θ, s, idx, x, y) -> (θ, s, mean loss)``: one :func:`bilevel_jax.base_step`
    of ``loss_fn(θ, (x[i], y[i]))`` and ``tx`` per row ``i`` of ``idx`` (a ``lax.scan``)."""
    import jax

    import bilevel_jax as bj

    @jax.jit
    def seg(theta, s, idx, x, y):
        def body(carry, i):
            r = bj.base_step(loss_fn, tx, *carry, (x[i], y[i]))
            return (r.params, r.opt_state), r.loss

        (theta, s), loss = jax.lax.scan(body, (theta, s), idx)
        return theta, s, loss.mean()

    return seg


def bilevel_segment(step: Callable) -> Callable:
    """Jitted ``seg(state, idx, x, y, x_me, y_me[, meta_idx]) -> (state, meta losses)``.

    ``idx``: (meta steps, K, B) base-batch indices into ``(x, y)``, one bilevel ``step`` per row.
    The meta batch is all of ``(x_me, y_me)``, or ``(x_me[j], y_me[j])`` with ``j = meta_idx[t]``
    at meta step ``t``.
    """
    import jax

    @jax.jit
    def seg(state, idx, x, y, x_me, y_me, meta_idx=None):
        def body(st, i_j):
            i, j = i_j
            meta = (x_me, y_me) if j is None else (x_me[j], y_me[j])
            st, m = step(st, (x[i], y[i]), meta)
            return st, m["meta_loss"]

        return jax.lax.scan(body, state, (idx, meta_idx))

    return seg


def compile_stats(fn: Callable, args: tuple, donate: tuple[int, ...] = ()) -> tuple[Any, dict]:
    """Compile ``fn`` for ``args``; return the executable, its temp bytes and FLOPs.

    (XLA's ``cost_analysis()`` counts a while-loop body once: compile one step, not a scan.)"""
    import jax

    compiled = jax.jit(fn, donate_argnums=donate).lower(*args).compile()
    mem = compiled.memory_analysis()
    if mem is None:
        raise RuntimeError("XLA gave no memory analysis for the compiled function")
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    if cost is None:
        raise RuntimeError("XLA gave no cost analysis for the compiled function")
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
    )
    return compiled, {
        "temp_bytes": int(mem.temp_size_in_bytes),
        "flops": float(cost["flops"]),
        "argument_bytes": int(mem.argument_size_in_bytes),
        "peak_bytes": int(peak),
    }


def matmul_flops(fn: Callable, args: tuple, *, while_trips: int = 1) -> float:
    """Matrix-multiply FLOPs of ``fn(*args)`` counted on its jaxpr, loops included.

    XLA's ``cost_analysis()`` counts a loop body once; here every ``dot_general`` counts
    ``2 · batch · contracted · lhs-free · rhs-free`` FLOPs, the body of a ``scan`` is multiplied
    by its length, a ``cond`` counts its costliest branch and a ``while_loop`` (whose trip count
    the jaxpr does not know; CG's solver, for one) counts ``while_trips`` times its body.
    Elementwise work is not counted (in a transformer it is a few percent). ``args`` may be
    ``jax.ShapeDtypeStruct``s: nothing is computed.

    >>> import jax, jax.numpy as jnp
    >>> def f(x, w):
    ...     return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=3)[0]
    >>> matmul_flops(f, (jnp.ones((2, 4)), jnp.ones((4, 4))))  # 3 × 2·2·4·4
    192.0
    """
    import jax
    from jax.extend import core as jax_core

    def count(jaxpr) -> float:
        total = 0.0
        for eqn in jaxpr.eqns:
            name, params = eqn.primitive.name, eqn.params
            if name == "dot_general":
                (lc, rc), (lb, _) = params["dimension_numbers"]
                lhs, rhs = (v.aval.shape for v in eqn.invars)
                batch = math.prod(lhs[d] for d in lb)
                contract = math.prod(lhs[d] for d in lc)
                lfree = math.prod(n for d, n in enumerate(lhs) if d not in lc and d not in lb)
                rb = params["dimension_numbers"][1][1]
                rfree = math.prod(n for d, n in enumerate(rhs) if d not in rc and d not in rb)
                total += 2.0 * batch * contract * lfree * rfree
            elif name == "scan":
                total += params["length"] * count(params["jaxpr"].jaxpr)
            elif name == "while":
                total += while_trips * count(params["body_jaxpr"].jaxpr)
            elif name == "cond":
                total += max(count(b.jaxpr) for b in params["branches"])
            else:
                for sub in jax_core.jaxprs_in_params(params):
                    total += count(sub)
        return total

    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def summarize(values: Sequence[float], seeds: Sequence[int]) -> dict:
    """``{"mean", "std", "seeds", "acc"}`` of per-seed values (population std)."""
    a = np.asarray(values, np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std()),
        "seeds": list(seeds),
        "acc": [float(v) for v in a],
    }
