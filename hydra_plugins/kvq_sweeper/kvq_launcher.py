"""``hydra/launcher=slurm`` (``conf/hydra/launcher/slurm.yaml``): hydra-submitit-launcher's SLURM
launcher with two guards.

* **Lost jobs are bounded.** submitit waits for a job's result file and asks ``sacct`` for its
  state; on a cluster without accounting that state is ``UNKNOWN`` forever, so a job cancelled
  or killed before it wrote its result hangs the driver. Here each job is watched with
  ``squeue`` (the controller's own view, no accounting needed): a job that has left the queue
  without a result, or whose state cannot be read, for ``lost_job_timeout_s`` is recorded as
  ``failed`` with one line, and the grid finishes.
* **GPUs are asked for only where they exist.** The default ``gpus_per_node: 1`` on a cluster
  without GPUs makes ``sbatch`` reject the array ("Invalid generic resource (gres)
  specification"); the partition's GRES are read with ``sinfo`` first and the grid fails with
  one line naming ``hydra.launcher.gpus_per_node=0``.
"""

import logging
import os
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher
from omegaconf import OmegaConf

from hydra_plugins.kvq_sweeper._jobs import failed_return, job_dir, record_failed

# No `from __future__ import annotations` (see kvq_sweeper.py).

log = logging.getLogger(__name__)

#: squeue states of a job that is still coming or running (anything else has ended)
_ALIVE = frozenset(
    {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
     "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "PREEMPTED", "RESV_DEL_HOLD"}
)  # fmt: skip


@dataclass
class KVQSlurmQueueConf(SlurmQueueConf):
    """``submitit_slurm`` plus the lost-job bound (``hydra.launcher.*``).

    Attributes:
        lost_job_timeout_s: how long a job may be out of the queue (or of unknown state) without
            its result before it is recorded as failed.
        poll_s: seconds between two looks at the queue.
    """

    _target_: str = "hydra_plugins.kvq_sweeper.kvq_launcher.KVQSlurmLauncher"
    lost_job_timeout_s: float = 120.0
    poll_s: float = 2.0


ConfigStore.instance().store(
    group="hydra/launcher", name="kvq_slurm", node=KVQSlurmQueueConf(), provider="kvq"
)


class LaunchError(RuntimeError):
    """The grid cannot be submitted as configured (one line)."""


def _squeue(job_ids: Sequence[str]) -> dict[str, str] | None:
    """``job id -> state`` of the jobs the controller still knows; ``None`` if squeue fails."""
    try:
        out = subprocess.run(
            ["squeue", "-h", "-r", "--states=all", "-o", "%i %T", "-j", ",".join(job_ids)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        return None
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


class KVQSlurmLauncher(SlurmLauncher):
    """The submitit SLURM launcher, with lost jobs bounded and GPUs checked (module docstring)."""

    def __init__(self, lost_job_timeout_s: float = 120.0, poll_s: float = 2.0, **params: Any) -> None:
        super().__init__(**params)
        self.lost_job_timeout_s = float(lost_job_timeout_s)
        self.poll_s = float(poll_s)

    # ------------------------------------------------------------------ submission
    def _check_gpus(self) -> None:
        gpus = self.params.get("gpus_per_node") or self.params.get("gpus_per_task")
        if not gpus and "gpu" not in str(self.params.get("gres") or ""):
            return
        part = self.params.get("partition")
        try:
            out = subprocess.run(
                ["sinfo", "-h", "-o", "%G", *(["-p", str(part)] if part else [])],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return  # cannot tell: sbatch decides
        if out.strip() and "gpu" not in out:
            where = f"partition {part}" if part else "the default partition"
            asked = f"gpus_per_node={gpus}" if gpus else f"gres={self.params.get('gres')}"
            raise LaunchError(
                f"hydra.launcher.{asked} but no node of {where} has a GPU (sinfo lists no gres/gpu): "
                "use hydra.launcher.gpus_per_node=0 on CPU nodes (accelerator=auto runs on the CPU)"
            )

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """Submit one job array; wait for every job, a lost one for at most ``lost_job_timeout_s``."""
        import submitit

        assert self.config is not None and len(job_overrides) > 0
        self._check_gpus()
        init_keys = {"max_num_timeout", "submitit_folder"}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=self.params["submitit_folder"],
            **{f"{self._EXECUTOR}_max_num_timeout": self.params["max_num_timeout"]},
        )
        baseparams = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{
                (k if k in baseparams else f"{self._EXECUTOR}_{k}"): v
                for k, v in self.params.items()
                if k not in init_keys
            }
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        job_params = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append(
                (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
            )
        jobs = executor.map_array(self, *zip(*job_params))
        return self._wait(jobs, job_overrides, initial_job_idx)

    # ------------------------------------------------------------------ waiting
    def _wait(
        self, jobs: Sequence[Any], job_overrides: Sequence[Sequence[str]], first: int
    ) -> list[JobReturn]:
        out: list[JobReturn | None] = [None] * len(jobs)
        lost_since: dict[int, float] = {}
        last_state: dict[int, str] = {}
        while any(r is None for r in out):
            pending = [i for i, r in enumerate(out) if r is None]
            states = _squeue([str(jobs[i].job_id) for i in pending])
            now = time.time()
            for i in pending:
                job = jobs[i]
                if job.paths.result_pickle.exists():
                    out[i] = self._result(job, job_overrides[i])
                    continue
                state = None if states is None else states.get(str(job.job_id))
                if state is not None:
                    last_state[i] = state
                if state in _ALIVE:
                    lost_since.pop(i, None)
                    continue
                since = lost_since.setdefault(i, now)
                if now - since < self.lost_job_timeout_s:
                    continue
                seen = last_state.get(i)
                reason = (
                    f"SLURM job {job.job_id} ended ({seen}) without a result"
                    if seen and seen not in _ALIVE
                    else f"SLURM job {job.job_id} left the queue without a result (state unknown: cancelled, "
                    "killed or lost; the cluster keeps no accounting to ask)"
                ) + f" -- waited {self.lost_job_timeout_s:g} s (hydra.launcher.lost_job_timeout_s)"
                log.warning("kvq launcher: job #%d: %s", first + i, reason)
                assert self.hydra_context is not None and self.config is not None
                where = job_dir(self.hydra_context.config_loader, self.config, job_overrides[i], first + i)
                record_failed(where, job_overrides[i], reason)
                out[i] = failed_return(job_overrides[i], reason)
            if any(r is None for r in out):
                time.sleep(self.poll_s)
        return [r for r in out if r is not None]

    @staticmethod
    def _result(job: Any, overrides: Sequence[str]) -> JobReturn:
        try:
            return job.results()[0]
        except Exception as e:  # noqa: BLE001 -- the job raised outside the task: one line
            from kvq.errors import one_line

            return failed_return(overrides, f"SLURM job {job.job_id} failed: {one_line(e)}")
