r"""Multi-host (multi-process) data parallelism: the same bilevel step over a global mesh.

A TPU pod or a multi-GPU cluster runs one Python process per host. Each process calls
:func:`initialize` once, before any other JAX call, and then runs the *same* program as on
one host (``docs/parallel.md``): the step of :func:`bilevel_jax.parallel.data_parallel` over
:func:`global_mesh`, with each process feeding only its own slice of every batch
(:func:`global_batch`). The step still needs one all-reduce per base step and one per meta
step; across hosts JAX runs them over the network (gloo on CPU, ICI/DCN on TPU, NCCL on GPU).

The recipe (``base_loss``, ``meta_loss``, ``theta0``, ``lam0`` and ``my_loader`` are yours)::

    import jax, optax
    import bilevel_jax as bj
    from bilevel_jax import distributed as dist
    from bilevel_jax.parallel import data_parallel

    dist.initialize()                      # reads BILEVEL_JAX_* variables, or pass them
    mesh = dist.global_mesh("data")        # every device of every process
    bilevel = bj.bilevel_step(base_loss, meta_loss, optax.adam(1e-3), optax.adam(1e-2), bj.sama())
    step = jax.jit(data_parallel(bilevel, mesh))
    state = dist.replicate(bilevel.init(theta0, lam0), mesh)
    for base_np, meta_np in my_loader(rows=dist.process_rows(global_batch_size)):
        base = dist.global_batch(base_np, mesh, batch_axis=1)   # (K, local_batch, ...)
        meta = dist.global_batch(meta_np, mesh)                 # (local_batch, ...)
        state, metrics = step(state, base, meta)
    theta = dist.to_host(state.base_params)   # identical on every process

:func:`launch_local` starts such a program as N processes on this machine (loopback), which
is how the multi-host path is tested on CPU. On a cluster, use the cluster's launcher
(SLURM, Kubernetes, ``gcloud ... --worker=all``) and pass its address and rank to
:func:`initialize`, or let ``jax.distributed.initialize`` detect them.

**A peer that never arrives.** ``jax.distributed.initialize`` does not raise when a process
is missing: after ``initialization_timeout`` seconds the C++ runtime *aborts* the waiting
processes (SIGABRT, "DEADLINE_EXCEEDED ... RegisterTask"). Run every process under a
supervisor that turns that into an error; :func:`launch_local` does, and names the process.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DistributedLaunchError",
    "global_batch",
    "global_mesh",
    "initialize",
    "launch_local",
    "process_rows",
    "replicate",
    "to_host",
]

PyTree = Any

ENV_COORDINATOR = "BILEVEL_JAX_COORDINATOR"
ENV_NUM_PROCESSES = "BILEVEL_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "BILEVEL_JAX_PROCESS_ID"
ENV_TIMEOUT = "BILEVEL_JAX_INIT_TIMEOUT"


class DistributedLaunchError(RuntimeError):
    """A process of a multi-process run failed, aborted or did not finish in time.

    >>> from bilevel_jax import distributed as dist
    >>> fail_on_1 = "import os, sys; sys.exit(3 * (os.environ['BILEVEL_JAX_PROCESS_ID'] == '1'))"
    >>> try:
    ...     dist.launch_local(["-c", fail_on_1], 2)
    ... except dist.DistributedLaunchError as e:
    ...     print(str(e).splitlines()[0])
    process 1 of 2 exited with status 3. End of its stderr:
    """


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: int | None = None,
    cpu_devices: int | None = None,
) -> None:
    """Join a multi-process JAX run (``jax.distributed.initialize`` with checked arguments).

    Arguments left as ``None`` are read from the environment variables that
    :func:`launch_local` sets (``BILEVEL_JAX_COORDINATOR``, ``BILEVEL_JAX_NUM_PROCESSES``,
    ``BILEVEL_JAX_PROCESS_ID``, ``BILEVEL_JAX_INIT_TIMEOUT``); if none is given at all, JAX's
    own cluster detection (SLURM, TPU pods, …) is used.

    Args:
      coordinator_address: ``"host:port"`` of process 0's coordination service.
      num_processes: the number of processes in the run.
      process_id: this process's rank in ``[0, num_processes)``.
      timeout_s: seconds to wait for every process to register (default 60 when set up from
        arguments or the environment). A missing peer makes JAX abort the process (SIGABRT)
        after this time; see the module docstring.
      cpu_devices: on CPU, the number of (fake) devices this process exposes, e.g. 4 to test
        a 2×4-device run on one machine. Must be given before JAX creates its backends.

    Raises:
      ValueError: inconsistent or malformed arguments.
      RuntimeError: JAX's backends already exist (``initialize`` must come first).

    The arguments are checked before JAX is touched:

    >>> from bilevel_jax import distributed as dist
    >>> dist.initialize("127.0.0.1", num_processes=2, process_id=0)
    Traceback (most recent call last):
    ValueError: coordinator_address must be 'host:port', got '127.0.0.1'
    >>> dist.initialize("127.0.0.1:1234", num_processes=2, process_id=2)
    Traceback (most recent call last):
    ValueError: need 0 <= process_id < num_processes, got process_id=2, num_processes=2
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get(ENV_COORDINATOR)
    if num_processes is None and ENV_NUM_PROCESSES in env:
        num_processes = int(env[ENV_NUM_PROCESSES])
    if process_id is None and ENV_PROCESS_ID in env:
        process_id = int(env[ENV_PROCESS_ID])
    if timeout_s is None:
        timeout_s = int(env.get(ENV_TIMEOUT, 60))
    given = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in given) and any(v is None for v in given):
        raise ValueError(
            "give all of coordinator_address, num_processes and process_id (or none, to let "
            f"JAX detect the cluster); got {coordinator_address=}, {num_processes=}, {process_id=}"
        )
    if coordinator_address is not None and num_processes is not None and process_id is not None:
        host, _, port = coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(
                f"coordinator_address must be 'host:port', got {coordinator_address!r}"
            )
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(
                f"need 0 <= process_id < num_processes, got {process_id=}, {num_processes=}"
            )
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if cpu_devices is not None:
        if cpu_devices < 1:
            raise ValueError(f"cpu_devices must be at least 1, got {cpu_devices}")
        # both this and jax.distributed.initialize raise a RuntimeError that says so when a
        # JAX computation already ran in this process
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if coordinator_address is not None:
        print(
            f"bilevel_jax: process {process_id}/{num_processes} joining {coordinator_address} "
            f"(waiting up to {timeout_s} s for every process)",
            file=sys.stderr,
            flush=True,
        )
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_s,
    )


def global_mesh(axis_name: str = "data") -> Mesh:
    """A 1-D mesh over every device of every process, in ``jax.devices()`` order.

    Its axis is of the ``Auto`` type that ``jax.shard_map`` over unsharded inputs needs
    (``jax.make_mesh`` would default to explicit axes), so it is what
    :func:`bilevel_jax.parallel.data_parallel` takes.

    >>> import jax
    >>> from bilevel_jax import distributed as dist
    >>> mesh = dist.global_mesh("data")
    >>> mesh.axis_names, mesh.devices.size == jax.device_count()
    (('data',), True)
    """
    return Mesh(np.array(jax.devices()), (axis_name,))


def process_rows(global_size: int) -> slice:
    """The rows of a global batch of ``global_size`` that this process loads.

    Process ``i`` of ``n`` owns the ``i``-th contiguous block of ``global_size / n`` rows, the
    block that :func:`global_batch` places on this process's devices.

    In a single process every row is local:

    >>> import jax
    >>> from bilevel_jax import distributed as dist
    >>> dist.process_rows(8 * jax.device_count()) == slice(0, 8 * jax.device_count())
    True
    """
    if isinstance(global_size, bool) or not isinstance(global_size, int) or global_size < 1:
        raise ValueError(f"global_size must be a positive integer, got {global_size!r}")
    n, i = jax.process_count(), jax.process_index()
    if global_size % (n * jax.local_device_count()):
        raise ValueError(
            f"global batch size {global_size} is not divisible by the {jax.device_count()} devices "
            f"({n} processes × {jax.local_device_count()})"
        )
    size = global_size // n
    return slice(i * size, (i + 1) * size)


def global_batch(
    local: PyTree, mesh: Mesh, *, axis_name: str = "data", batch_axis: int = 0
) -> PyTree:
    """Assemble per-process batch slices into global arrays split over ``mesh[axis_name]``.

    Each process passes only the rows it loaded (:func:`process_rows`); every leaf becomes a
    global ``jax.Array`` whose ``batch_axis`` is the concatenation, in process order, of the
    processes' slices (``jax.make_array_from_process_local_data``). Use ``batch_axis=1`` for
    the ``(K, batch, ...)`` base batches of a bilevel step.

    >>> import jax, numpy as np
    >>> from bilevel_jax import distributed as dist
    >>> mesh, n = dist.global_mesh(), jax.device_count()
    >>> base = dist.global_batch(np.zeros((5, 4 * n, 3), np.float32), mesh, batch_axis=1)
    >>> base.shape == (5, 4 * n, 3), tuple(base.sharding.spec)
    (True, (None, 'data'))
    """

    def one(x):
        x = np.asarray(x)
        if x.ndim <= batch_axis:
            raise ValueError(f"a batch leaf of shape {x.shape} has no axis {batch_axis} to split")
        per_device = x.shape[batch_axis] / jax.local_device_count()
        if per_device != int(per_device) or per_device == 0:
            raise ValueError(
                f"this process's batch axis has {x.shape[batch_axis]} rows, not a positive "
                f"multiple of its {jax.local_device_count()} devices"
            )
        spec = P(*([None] * batch_axis), axis_name)
        return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), x)

    return jax.tree.map(one, local)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Place ``tree`` on every device of ``mesh`` (each process must pass the same values).

    >>> import jax.numpy as jnp
    >>> from bilevel_jax import distributed as dist
    >>> state = dist.replicate({"w": jnp.ones(3)}, dist.global_mesh())
    >>> state["w"].sharding.is_fully_replicated
    True
    """
    return jax.device_put(tree, NamedSharding(mesh, P()))


def to_host(tree: PyTree) -> PyTree:
    """NumPy copies of replicated (or single-process) arrays, readable on every process.

    >>> import jax.numpy as jnp
    >>> from bilevel_jax import distributed as dist
    >>> dist.to_host({"w": dist.replicate(jnp.arange(3), dist.global_mesh())})
    {'w': array([0, 1, 2], dtype=int32)}
    """

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if not x.is_fully_replicated:
                raise ValueError(
                    f"to_host needs a replicated array; this one is sharded as {x.sharding}"
                )
            return np.asarray(x.addressable_data(0))
        return np.asarray(x)

    return jax.tree.map(one, tree)


# -- local launcher --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: str, n: int = 15) -> str:
    with open(path, errors="replace") as f:
        lines = [ln for ln in f.read().splitlines() if not ln.lstrip().startswith("@ ")]
    return "\n".join(lines[-n:])


def _describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


def _first_failure(procs: list[subprocess.Popen], timeout_s: float) -> tuple[int, int] | None:
    """Wait until every process has exited or one has failed: ``(rank, returncode)`` of the
    first failure, or None. Raises :class:`DistributedLaunchError` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        codes = [p.poll() for p in procs]
        failed = next(((r, c) for r, c in enumerate(codes) if c not in (None, 0)), None)
        if failed is not None or None not in codes:
            return failed
        if time.monotonic() > deadline:
            waiting = [r for r, c in enumerate(codes) if c is None]
            raise DistributedLaunchError(
                f"multi-process run did not finish within {timeout_s:g} s; processes "
                f"{waiting} were still running and have been killed"
            )
        time.sleep(0.05)


def launch_local(
    argv: Sequence[str],
    num_processes: int,
    *,
    timeout_s: float = 300.0,
    init_timeout_s: int = 60,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> list[str]:
    """Run ``python *argv`` as ``num_processes`` processes on this machine and wait for all.

    Every process gets the ``BILEVEL_JAX_*`` variables that make a bare :func:`initialize`
    join a run coordinated on a free loopback port. The first process to fail stops the run:
    the others are killed and :class:`DistributedLaunchError` names the failed process, how it
    ended and the end of its output. A process aborted by the coordination service because a
    peer never registered is reported as such.

    Args:
      argv: the arguments after ``python`` (e.g. ``["-m", "experiments.multihost_demo"]``).
      num_processes: how many processes to start.
      timeout_s: wall-clock limit for the whole run; on expiry every process is killed.
      init_timeout_s: passed to :func:`initialize` as the registration timeout.
      env: extra environment variables for every process.
      cwd: working directory of the processes.

    Returns:
      The standard output of each process, in rank order.

    >>> from bilevel_jax import distributed as dist
    >>> outputs = dist.launch_local(["-c", "import os; print(os.environ['BILEVEL_JAX_PROCESS_ID'])"], 2)
    >>> [out.strip() for out in outputs]
    ['0', '1']
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be at least 1, got {num_processes}")
    address = f"127.0.0.1:{_free_port()}"
    with tempfile.TemporaryDirectory(prefix="bilevel_jax_launch_") as logs:
        procs = []
        for rank in range(num_processes):
            penv = dict(os.environ, **(env or {}))
            penv.update(
                {
                    ENV_COORDINATOR: address,
                    ENV_NUM_PROCESSES: str(num_processes),
                    ENV_PROCESS_ID: str(rank),
                    ENV_TIMEOUT: str(init_timeout_s),
                    "PYTHONUNBUFFERED": "1",
                }
            )
            with open(f"{logs}/{rank}.out", "w") as fo, open(f"{logs}/{rank}.err", "w") as fe:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, *argv], env=penv, cwd=cwd, stdout=fo, stderr=fe
                    )
                )
        try:
            failure = _first_failure(procs, timeout_s)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if failure is not None:
            rank, rc = failure
            tail = _tail(f"{logs}/{rank}.err")
            why = ""
            if "RegisterTask" in tail or "DEADLINE_EXCEEDED" in tail:
                why = (
                    f": a peer process never registered with the coordinator at {address} "
                    f"within {init_timeout_s} s"
                )
            raise DistributedLaunchError(
                f"process {rank} of {num_processes} {_describe_exit(rc)}{why}. "
                f"End of its stderr:\n{tail}"
            )
        outputs = []
        for rank in range(num_processes):
            with open(f"{logs}/{rank}.out") as f:
                outputs.append(f.read())
        return outputs
