"""Persistent worker processes for ``hydra/launcher=local_gpus`` (``kvq_local_gpus.py``).

Each worker is a ``spawn``-ed process started with its own environment (``CUDA_VISIBLE_DEVICES``,
CPU thread counts), so the variable is in place before anything in it can initialise CUDA. A
worker unpickles the multirun once (Hydra context, config, task function, Hydra's singletons),
then runs jobs one at a time with Hydra's own ``run_job``, exactly as the basic launcher does in
its single process: jobs of one worker share its in-process model cache (``kvq.models.load_cached``).

Each worker talks to the driver over its own pipe (the multirun, then ``job`` in; ``hello`` /
``ready`` / ``done`` / ``fatal`` out), so a worker killed in the middle of a message (out of memory, ``kill -9``) breaks only its
own pipe; the driver sees its exit through the process sentinel.

(A leading underscore: Hydra's plugin scanner does not import this module; the launcher does.)
"""

import logging
import os
import pickle
import signal
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from hydra.core.utils import JobReturn, JobStatus

log = logging.getLogger(__name__)

__all__ = ["Worker", "WorkerSpec", "spawn_worker", "worker_main"]

#: environment variables of a worker's CPU thread pools (OpenMP, MKL, OpenBLAS, numexpr)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker is started with.

    Attributes:
        wid: worker number (0..n_workers-1); a replacement keeps the number of the one it replaces.
        cuda_visible_devices: its ``CUDA_VISIBLE_DEVICES`` (``None``: inherited from the driver).
        threads: CPU threads of its torch / OpenMP pools (``None``: the libraries' defaults).
    """

    wid: int
    cuda_visible_devices: str | None
    threads: int | None

    def env(self) -> dict[str, str]:
        """The environment variables this worker is started with (beyond the driver's)."""
        out = {}
        if self.cuda_visible_devices is not None:
            out["CUDA_VISIBLE_DEVICES"] = self.cuda_visible_devices
        if self.threads is not None:
            out.update({k: str(self.threads) for k in THREAD_VARS})
        return out

    def describe(self, pid: int | None = None) -> str:
        """``worker 1 (CUDA_VISIBLE_DEVICES='1', pid 4242)`` (only what is known)."""
        parts = (
            []
            if self.cuda_visible_devices is None
            else [f"CUDA_VISIBLE_DEVICES={self.cuda_visible_devices!r}"]
        )
        parts += [] if pid is None else [f"pid {pid}"]
        return f"worker {self.wid}" + (f" ({', '.join(parts)})" if parts else "")


@dataclass
class Worker:
    """The driver's view of a running worker."""

    spec: WorkerSpec
    process: Any  # multiprocessing.context.SpawnProcess
    conn: Connection
    pid: int | None = None
    ready: bool = False
    job: int | None = None  # position (in the current launch) of the job it runs
    model: tuple[str, ...] | None = None  # the model overrides of the last job it was given
    done: int = 0
    retired: bool = False

    def name(self) -> str:
        return self.spec.describe(self.pid or self.process.pid)


@contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set, for the duration (a spawned child copies it at exec)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def spawn_worker(ctx: Any, spec: WorkerSpec) -> Worker:
    """Start one worker (``spawn``): its environment is the driver's plus :meth:`WorkerSpec.env`,
    inherited at exec, so ``CUDA_VISIBLE_DEVICES`` is set before the child imports anything."""
    env = spec.env()
    parent, child = ctx.Pipe(duplex=True)
    proc = ctx.Process(
        target=worker_main,
        args=(spec, child),  # the payload goes over the pipe once it asks (see worker_main)
        name=f"kvq-worker-{spec.wid}",
        daemon=False,  # a daemonic process may not start children (data-loader workers)
    )
    with _environ(env):
        proc.start()
    child.close()
    return Worker(spec=spec, process=proc, conn=parent)


# ---------------------------------------------------------------------------------------- child
def _dump(ret: JobReturn) -> bytes:
    """``ret`` pickled for the driver; an exception that cannot be pickled becomes its one line."""
    import cloudpickle

    try:
        return cloudpickle.dumps(ret)
    except Exception:  # noqa: BLE001 -- e.g. an exception class with required init arguments
        from kvq.errors import KVQError, one_line

        err = ret._return_value
        line = f"{type(err).__name__}: {one_line(err)}" if isinstance(err, BaseException) else repr(err)
        ret._return_value = KVQError(line)
        return cloudpickle.dumps(ret)


def _run_one(context: tuple[Any, Any, Any], num: int, overrides: Sequence[str]) -> JobReturn:
    """One job, as Hydra's basic launcher runs it (``load_sweep_config`` + ``run_job``)."""
    from hydra.core.utils import run_job
    from omegaconf import open_dict

    hydra_context, config, task_function = context
    sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = num
        sweep_config.hydra.job.num = num
    ret = run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )
    if ret.status == JobStatus.FAILED:  # here the traceback still exists: <job dir>/traceback.txt
        from hydra_plugins.kvq_sweeper._jobs import job_failure

        job_failure(ret)
    return ret


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """A worker's life: say ``hello``, receive the multirun (pickled Hydra context, config, task
    function and singletons) and set up once, say ``ready``, then run the jobs the driver sends
    until told to stop (or until the driver is gone: its end of the pipe closes).

    The multirun is not a ``Process`` argument: ``spawn`` writes those to the child only after it
    has imported the driver's main module, and the driver would wait for each child in turn.

    Ctrl-C is the driver's to handle (a terminal sends SIGINT to every process of the group): it
    stops the workers with SIGTERM, which ``kvq.run`` turns into a recorded, failed run.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        conn.send(("hello", os.getpid()))
        payload = conn.recv_bytes()
    except (EOFError, OSError):
        return
    try:
        from hydra.core.singleton import Singleton
        from hydra.core.utils import setup_globals

        hydra_context, config, task_function, singletons = pickle.loads(payload)
        Singleton.set_state(singletons)
        setup_globals()
        if spec.threads is not None:
            import torch

            torch.set_num_threads(spec.threads)
    except BaseException as e:  # noqa: BLE001 -- the driver gets one line and retires this worker
        from kvq.errors import one_line

        conn.send(("fatal", os.getpid(), f"worker could not start: {type(e).__name__}: {one_line(e)}"))
        return
    context = (hydra_context, config, task_function)
    conn.send(("ready", os.getpid(), os.environ.get("CUDA_VISIBLE_DEVICES")))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the driver is gone
            return
        if msg[0] != "job":
            return
        _, num, overrides = msg
        t0 = time.perf_counter()
        stop = False
        try:
            ret = _run_one(context, num, overrides)
        except BaseException as e:  # noqa: BLE001 -- SIGTERM (kvq.run.Terminated), Ctrl-C, a crash in Hydra
            from hydra_plugins.kvq_sweeper._jobs import failed_return
            from kvq.errors import one_line

            ret = failed_return(overrides, f"{type(e).__name__}: {one_line(e)}")
            stop = isinstance(e, (KeyboardInterrupt, SystemExit))
        try:
            conn.send(("done", num, _dump(ret), time.perf_counter() - t0))
        except (EOFError, OSError):
            return
        if stop:
            return
