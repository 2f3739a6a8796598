"""``hydra/launcher=local_gpus`` (``conf/hydra/launcher/local_gpus.yaml``): every GPU of one machine
busy without SLURM.

``n_workers`` persistent worker processes (``multiprocessing`` ``spawn``), each started with its
own ``CUDA_VISIBLE_DEVICES`` (one entry of ``devices``; default: every visible GPU, one worker
each) and its share of the CPU threads. The driver -- the ``python train_eval.py -m`` process,
which keeps the ``kvq`` sweeper's validation, de-duplication, exit code and grid report -- deals
the jobs out one at a time as workers free up, preferring a worker that already holds the job's
model: each worker loads a model once and runs many jobs on it (``kvq.models.load_cached``), as
the basic launcher does in its one process.

* **A job runs as under the basic launcher**: Hydra's ``run_job`` in the worker, same job
  directories, ``.hydra/`` files, logs and ``result.json``; results come back in grid order.
* **A crashed job does not stop the grid.** A job that raises is failed with its one line (the
  traceback in ``<job dir>/traceback.txt``); a worker that dies (out of memory, ``kill -9``)
  fails the job it held, recorded in that job's ``result.json``, and is replaced on the same
  device.
* **Ctrl-C** stops the workers (their runs are recorded as failed, nothing half-done is stored).

Why not hydra-joblib-launcher (loky) or submitit's local executor: see docs/grids.md.
"""

import atexit
import logging
import os
import pickle
import signal
import time
from collections import Counter, deque
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from hydra_plugins.kvq_sweeper._jobs import failed_return, job_dir, record_failed
from hydra_plugins.kvq_sweeper._pool import THREAD_VARS, Worker, WorkerSpec, spawn_worker

# No `from __future__ import annotations` (see kvq_sweeper.py).

log = logging.getLogger(__name__)

#: override keys whose jobs share a loaded model (the in-process cache is keyed by model and device)
_MODEL_KEYS = ("model", "accelerator")


@dataclass
class LocalGPUsConf:
    """``hydra.launcher.*`` of ``hydra/launcher=local_gpus``.

    Attributes:
        n_workers: worker processes; ``null`` = one per entry of ``devices`` (2 when there is none).
        devices: one ``CUDA_VISIBLE_DEVICES`` value per worker (dealt round-robin when
            ``n_workers`` is larger): GPU indices, UUIDs, or ``"0,1"`` for a two-GPU worker;
            ``null`` = each visible GPU (``$CUDA_VISIBLE_DEVICES``, else all); ``[]`` = none
            (CPU workers, GPUs hidden).
        threads_per_worker: CPU threads of each worker's torch / OpenMP pools; ``null`` = the CPUs
            divided by the workers (unless ``OMP_NUM_THREADS`` is set: then it is inherited).
        stop_timeout_s: how long idle workers get to exit at the end before they are terminated.
    """

    _target_: str = "hydra_plugins.kvq_sweeper.kvq_local_gpus.LocalGPUsLauncher"
    n_workers: int | None = None
    devices: list[str] | None = None
    threads_per_worker: int | None = None
    stop_timeout_s: float = 60.0


ConfigStore.instance().store(
    group="hydra/launcher", name="kvq_local_gpus", node=LocalGPUsConf, provider="kvq"
)


class LaunchError(RuntimeError):
    """The workers cannot be set up as configured (one line)."""


def visible_devices() -> list[str]:
    """The GPUs this process may use, as ``CUDA_VISIBLE_DEVICES`` entries: its own
    ``$CUDA_VISIBLE_DEVICES`` (up to an invalid entry, as CUDA reads it), else ``0..n-1`` for the
    ``n`` GPUs torch counts (no CUDA context is created in the driver)."""
    value = os.environ.get("CUDA_VISIBLE_DEVICES")
    if value is not None:
        out = []
        for entry in value.split(","):
            entry = entry.strip()
            if not entry or entry.startswith("-"):
                break
            out.append(entry)
        return out
    return [str(i) for i in range(_gpu_count())]


def _gpu_count() -> int:
    try:
        import torch

        return int(torch.cuda.device_count())
    except Exception:  # noqa: BLE001 -- no usable CUDA: no GPUs
        return 0


def plan_workers(
    n_workers: int | None, devices: Sequence[Any] | None, threads: int | None
) -> list[WorkerSpec]:
    """The workers to start (module docstring; :class:`LocalGPUsConf` for the arguments)."""
    explicit = devices is not None
    devs = [str(d).strip() for d in devices] if devices is not None else visible_devices()
    n = n_workers if n_workers is not None else (len(devs) or 2)
    if n < 1:
        raise LaunchError(f"hydra.launcher.n_workers must be at least 1, got {n}")
    count = _gpu_count() if explicit and "CUDA_VISIBLE_DEVICES" not in os.environ else 0
    bad = [d for d in devs for i in d.split(",") if count and i.strip().isdigit() and int(i) >= count]
    if bad:
        raise LaunchError(
            f"hydra.launcher.devices={devs}: this machine has {count} GPU(s) (0..{count - 1}); "
            f"{', '.join(bad)} would leave a worker without its GPU"
        )
    if threads is None and not any(v in os.environ for v in THREAD_VARS):
        threads = max(1, len(os.sched_getaffinity(0)) // n)
    if threads is not None and threads < 1:
        raise LaunchError(f"hydra.launcher.threads_per_worker must be at least 1, got {threads}")
    if devs:
        cvd: list[str | None] = [devs[i % len(devs)] for i in range(n)]
    else:  # devices=[]: hide the GPUs; nothing visible: leave the environment alone
        cvd = ["" if explicit else None] * n
    return [WorkerSpec(i, cvd[i], threads) for i in range(n)]


def model_key(overrides: Sequence[str]) -> tuple[str, ...]:
    """What decides a job's loaded model: its ``model``/``model.*``/``accelerator`` overrides."""
    keys = []
    for o in overrides:
        k = str(o).split("=", 1)[0].lstrip("+~")
        if k in _MODEL_KEYS or k.startswith("model."):
            keys.append(str(o))
    return tuple(sorted(keys))


def pick(
    current: tuple[str, ...] | None, pending: dict[tuple[str, ...], deque], held: Counter
) -> tuple[str, ...] | None:
    """The model group a free worker takes its next job from: the model it holds while that has
    jobs left; else the group with the most jobs per worker already on it (first in grid order
    on ties), so workers spread over models and each loads few."""
    if current in pending:
        return current
    if not pending:
        return None
    keys = list(pending)
    best = max(range(len(keys)), key=lambda i: (len(pending[keys[i]]) / (1 + held[keys[i]]), -i))
    return keys[best]


def _exit_line(code: int | None) -> str:
    if code is None:
        return "is gone"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


class LocalGPUsLauncher(Launcher):
    """Persistent per-device worker processes on this machine (module docstring)."""

    def __init__(
        self,
        n_workers: int | None = None,
        devices: Sequence[Any] | None = None,
        threads_per_worker: int | None = None,
        stop_timeout_s: float = 60.0,
    ) -> None:
        self.n_workers = n_workers
        self.devices = None if devices is None else [str(d) for d in devices]
        self.threads_per_worker = threads_per_worker
        self.stop_timeout_s = float(stop_timeout_s)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None
        self.workers: list[Worker] = []
        self._ctx: Any = None
        self._payload: bytes | None = None
        self._why_gone: str | None = None  # why the last worker could not start
        self._replaced = 0
        self._ran: Counter = Counter()  # jobs per worker in the current launch

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    # ------------------------------------------------------------------ workers
    def _start(self) -> None:
        import multiprocessing

        import cloudpickle

        specs = plan_workers(self.n_workers, self.devices, self.threads_per_worker)
        self._ctx = multiprocessing.get_context("spawn")
        self._payload = cloudpickle.dumps(
            (self.hydra_context, self.config, self.task_function, Singleton.get_state())
        )
        self.workers = [spawn_worker(self._ctx, s) for s in specs]
        atexit.register(self.close)
        threads = specs[0].threads
        log.info(
            "local_gpus: %d worker(s): %s; CPU threads per worker: %s",
            len(specs),
            ", ".join(s.describe() for s in specs),
            threads if threads is not None else "inherited ($OMP_NUM_THREADS)",
        )

    def close(self, terminate: bool = False) -> None:
        """Stop the workers: idle ones are asked to exit (``terminate``: sent SIGTERM at once, so a
        running job records itself as failed), stragglers are terminated, then killed."""
        workers, self.workers = self.workers, []
        atexit.unregister(self.close)
        for w in workers:
            if w.process.is_alive() and not terminate:
                with suppress(OSError):
                    w.conn.send(("stop",))
            elif w.process.is_alive():
                w.process.terminate()
        deadline = time.time() + (10.0 if terminate else self.stop_timeout_s)
        for w in workers:
            w.process.join(max(0.0, deadline - time.time()))
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(10.0)
            if w.process.is_alive():
                w.process.kill()
                w.process.join(5.0)
            w.conn.close()

    def _replace(self, w: Worker) -> None:
        assert self._ctx is not None and self._payload is not None
        self._replaced += 1
        new = spawn_worker(self._ctx, w.spec)
        self.workers[self.workers.index(w)] = new
        log.warning("local_gpus: %s replaced by a new worker (pid %s)", w.name(), new.process.pid)

    # ------------------------------------------------------------------ launch
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Run the jobs on the workers; their returns in the order of ``job_overrides``."""
        setup_globals()
        assert self.config is not None and self.hydra_context is not None and len(job_overrides) > 0
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        if not self.workers:
            self._start()
        for w in [w for w in self.workers if w.retired and w.ready]:  # died after the last launch
            self._replace(w)
        log.info("Launching %d jobs on %d local worker(s)", len(job_overrides), len(self.workers))
        try:
            return self._run(job_overrides, initial_job_idx)
        except KeyboardInterrupt:
            self.close(terminate=True)
            raise

    def _run(self, job_overrides: Sequence[Sequence[str]], first: int) -> list[JobReturn]:
        t0 = time.perf_counter()
        self._ran = Counter()
        out: list[JobReturn | None] = [None] * len(job_overrides)
        pending: dict[tuple[str, ...], deque] = {}
        for pos, overrides in enumerate(job_overrides):
            pending.setdefault(model_key(overrides), deque()).append(pos)
        while any(r is None for r in out):
            self._dispatch(pending, job_overrides, first)
            live = [w for w in self.workers if not w.retired]
            if not live:
                why = self._why_gone or "no worker is left"
                for pos in [p for p, r in enumerate(out) if r is None]:
                    out[pos] = self._fail(job_overrides[pos], first + pos, f"not run: {why}")
                pending.clear()
                break
            ready = set(wait([w.conn for w in live] + [w.process.sentinel for w in live], timeout=5.0))
            for w in live:
                if w.conn not in ready and w.process.sentinel not in ready:
                    continue
                closed = self._receive(w, out, pending, job_overrides, first)
                if not w.retired and (closed or not w.process.is_alive()):
                    self._lost(w, out, pending, job_overrides, first)
        log.info(
            "local_gpus: %d jobs in %.1f s (%s)",
            len(out),
            time.perf_counter() - t0,
            ", ".join(f"{n}: {k}" for n, k in self._ran.items()) or "nothing ran",
        )
        return [r for r in out if r is not None]

    def _dispatch(self, pending: dict, job_overrides: Sequence[Sequence[str]], first: int) -> None:
        for w in self.workers:
            if w.retired or not w.ready or w.job is not None:
                continue
            held = Counter(x.model for x in self.workers if x is not w and not x.retired)
            key = pick(w.model, pending, held)
            if key is None:
                return
            pos = pending[key].popleft()
            if not pending[key]:
                del pending[key]
            try:
                w.conn.send(("job", first + pos, list(job_overrides[pos])))
            except OSError:  # it died: put the job back, _lost() deals with the worker
                pending.setdefault(key, deque()).appendleft(pos)
                continue
            w.job, w.model = pos, key
            log.info(
                "\t#%d : %s -> %s", first + pos, " ".join(filter_overrides(job_overrides[pos])), w.name()
            )

    def _receive(
        self, w: Worker, out: list, pending: dict, job_overrides: Sequence[Sequence[str]], first: int
    ) -> bool:
        """Handle every message ``w`` has sent; ``True`` when its end of the pipe is closed."""
        while not w.retired:
            try:
                if not w.conn.poll():
                    return False
                msg = w.conn.recv()
            except (EOFError, OSError):  # it has exited (or is about to)
                return True
            kind = msg[0]
            if kind == "hello":  # it has imported what it needs to unpickle the multirun
                w.pid = msg[1]
                try:
                    w.conn.send_bytes(self._payload or b"")
                except OSError:
                    return True
            elif kind == "ready":
                w.pid, w.ready = msg[1], True
            elif kind == "fatal":
                self._why_gone = f"{w.name()}: {msg[2]}"
                log.error("local_gpus: %s", self._why_gone)
                w.retired = True
                if w.job is not None:  # never started: back to the queue for another worker
                    pending.setdefault(w.model, deque()).appendleft(w.job)
                    w.job = None
                w.process.join(5.0)
            elif kind == "done" and w.job is not None:
                pos, num = w.job, msg[1]
                try:
                    ret = pickle.loads(msg[2])
                except Exception as e:  # noqa: BLE001
                    from kvq.errors import one_line

                    ret = self._fail(
                        job_overrides[pos], num, f"its result could not be read back: {one_line(e)}"
                    )
                out[pos] = ret
                w.job, w.done = None, w.done + 1
                self._ran[w.name()] += 1
                log.info("local_gpus: #%d done on %s in %.1f s", num, w.name(), msg[3])
        return False

    def _lost(
        self, w: Worker, out: list, pending: dict, job_overrides: Sequence[Sequence[str]], first: int
    ) -> None:
        """A worker exited without being asked: fail its job, replace it if it ever started."""
        if w.retired:
            return
        w.retired = True
        w.process.join(5.0)
        line = f"{w.name()} {_exit_line(w.process.exitcode)}"
        if w.job is not None and not w.ready:  # it never started the job: back to the queue
            pending.setdefault(w.model, deque()).appendleft(w.job)
            w.job = None
        if w.job is not None:
            pos, w.job = w.job, None
            reason = f"{line} while running the job"
            log.error("local_gpus: job #%d: %s", first + pos, reason)
            out[pos] = self._fail(job_overrides[pos], first + pos, reason)
        if not w.ready:  # it never started: a replacement would die the same way
            self._why_gone = f"{line} before it was ready (its error is on stderr above)"
            log.error("local_gpus: %s", self._why_gone)
        elif pending and self._replaced < len(job_overrides):
            self._replace(w)

    def _fail(self, overrides: Sequence[str], num: int, reason: str) -> JobReturn:
        assert self.hydra_context is not None and self.config is not None
        try:
            where = job_dir(self.hydra_context.config_loader, self.config, overrides, num)
        except Exception as e:  # noqa: BLE001 -- conf/ changed under the grid: the console line says it
            log.warning("local_gpus: job #%d: no job directory to record the failure in: %s", num, e)
        else:
            record_failed(where, overrides, reason)
        return failed_return(overrides, reason)
