"""Multi-process (multi-host) runs on JAX's distributed runtime.

Every process of a multi-host job runs the same command. :func:`initialize` connects them
(``jax.distributed.initialize``) before any device is touched; after that ``jax.devices()`` lists
the devices of all processes, the mesh spans all of them, and every ``jax.jit`` step is one SPMD
program over the global arrays. Where the settings come from, first match wins:

1. the config section ``distributed:`` (``coordinator_address``, ``num_processes``, ``process_id``,
   ``local_device_ids``);
2. the environment: ``SFTRL_JAX_COORDINATOR_ADDRESS`` (else JAX's own ``JAX_COORDINATOR_ADDRESS``),
   ``SFTRL_JAX_NUM_PROCESSES``, ``SFTRL_JAX_PROCESS_ID``, and JAX's ``JAX_LOCAL_DEVICE_IDS``;
3. JAX's cluster auto-detection (Cloud TPU pod slices on GCE and GKE, SLURM, Open MPI's
   ``mpirun``/``mpiexec``, Kubernetes JobSets): whatever is still unset is filled by JAX.

With ``distributed.mode: auto`` (the default) the runtime is started only for a real multi-process
job: ``num_processes > 1`` from (1) or (2), or a detected cluster reporting more than one process.
A plain ``python``/``sftrl-jax`` run, a single-host TPU VM and a one-task SLURM job stay single
process. ``mode: on`` always initializes (JAX fills what is unset), ``mode: off`` never does.

On CPU the cross-process collectives need an implementation: ``distributed.cpu_collectives``
(``gloo`` by default) is set before the backend starts.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np

log = logging.getLogger("sftrl_jax.distributed")

ENV_COORDINATOR_ADDRESS = "SFTRL_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "SFTRL_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SFTRL_JAX_PROCESS_ID"
JAX_ENV_COORDINATOR_ADDRESS = "JAX_COORDINATOR_ADDRESS"
JAX_ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"


@dataclasses.dataclass
class DistributedOptions:
    mode: Literal["auto", "on", "off"] = "auto"  # auto: only when more than one process is configured/detected
    coordinator_address: str | None = None  # host:port of process 0 (env SFTRL_JAX_COORDINATOR_ADDRESS)
    num_processes: int | None = None  # processes in the job (env SFTRL_JAX_NUM_PROCESSES)
    process_id: int | None = None  # this process, 0 .. num_processes-1 (env SFTRL_JAX_PROCESS_ID)
    local_device_ids: list[int] | None = None  # local devices this process uses (env JAX_LOCAL_DEVICE_IDS)
    initialization_timeout: int = 300  # seconds to wait for every process to connect
    cpu_collectives: Literal["gloo", "mpi"] = "gloo"  # cross-process collectives on CPU devices

    _ranges = {"num_processes": ">= 1", "process_id": ">= 0", "initialization_timeout": ">= 1"}


@dataclasses.dataclass
class InitPlan:
    """The arguments :func:`initialize` passes to ``jax.distributed.initialize`` (None: JAX fills it)."""

    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: list[int] | None
    reason: str


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an integer, got {raw!r}") from None


def detect_cluster() -> tuple[str, int] | None:
    """``(cluster name, process count)`` of the cluster JAX's auto-detection would use, or None.

    Uses JAX's own cluster classes (the ones ``jax.distributed.initialize()`` consults), skipping
    the opt-in-only ones (mpi4py). Any failure of a probe counts as "not this cluster".
    """
    try:
        from jax._src import clusters
    except ImportError:  # pragma: no cover - a JAX without the cluster registry
        return None
    for env in clusters.ClusterEnv._cluster_types:
        if getattr(env, "opt_in_only_method", False):
            continue
        try:
            if env.is_env_present():
                return getattr(env, "name", "") or env.__name__, int(env.get_process_count())
        except Exception as err:  # noqa: BLE001 - a probe that cannot run means "not detected"
            log.debug("cluster probe %s failed: %s", env.__name__, err)
    return None


def plan(options: DistributedOptions, environ: Mapping[str, str] | None = None,
         detect: Callable[[], tuple[str, int] | None] = detect_cluster) -> InitPlan | None:
    """Decide whether (and with what) to start the distributed runtime; None for a single process."""
    environ = os.environ if environ is None else environ
    if options.mode == "off":
        return None
    coordinator = (options.coordinator_address or environ.get(ENV_COORDINATOR_ADDRESS)
                   or environ.get(JAX_ENV_COORDINATOR_ADDRESS) or None)
    num_processes = options.num_processes if options.num_processes is not None else _env_int(
        environ, ENV_NUM_PROCESSES)
    process_id = options.process_id if options.process_id is not None else _env_int(environ, ENV_PROCESS_ID)
    local_ids = options.local_device_ids
    if local_ids is None and environ.get(JAX_ENV_LOCAL_DEVICE_IDS, "").strip():
        local_ids = [int(x) for x in environ[JAX_ENV_LOCAL_DEVICE_IDS].split(",")]

    if num_processes is not None and num_processes < 1:
        raise ValueError(f"distributed.num_processes must be >= 1, got {num_processes}")
    if process_id is not None and process_id < 0:
        raise ValueError(f"distributed.process_id must be >= 0, got {process_id}")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ValueError(f"distributed.process_id ({process_id}) must be below distributed.num_processes "
                         f"({num_processes})")
    if coordinator is not None and ":" not in coordinator:
        raise ValueError(f"distributed.coordinator_address must be host:port, got {coordinator!r}")

    def make(reason: str) -> InitPlan:
        return InitPlan(coordinator, num_processes, process_id, local_ids, reason)

    if options.mode == "on":
        return make("distributed.mode=on")
    if num_processes == 1:
        return None
    explicit = num_processes is not None or coordinator is not None or process_id is not None
    if num_processes is not None and coordinator is not None and process_id is not None:
        return make(f"{num_processes} processes configured")
    cluster = detect()
    if explicit:
        if cluster is None:
            missing = [key for key, value in (("distributed.coordinator_address", coordinator),
                                              ("distributed.num_processes", num_processes),
                                              ("distributed.process_id", process_id)) if value is None]
            raise ValueError(f"multi-process run partly configured: set {', '.join(missing)} (or "
                             f"{ENV_COORDINATOR_ADDRESS} / {ENV_NUM_PROCESSES} / {ENV_PROCESS_ID}); no TPU pod, "
                             "SLURM or Open MPI environment was detected to fill them in")
        if cluster[1] <= 1 and (num_processes or 0) <= 1:
            return None
        return make(f"{cluster[0]} cluster, missing values auto-detected")
    if cluster is not None and cluster[1] > 1:
        return make(f"{cluster[0]} cluster with {cluster[1]} processes detected")
    return None


def initialize(options: DistributedOptions | None = None, environ: Mapping[str, str] | None = None) -> bool:
    """Start JAX's distributed runtime when this is a multi-process run; returns whether it is running.

    Idempotent: a second call (e.g. the CLI, then ``run_sft``) does nothing. Must run before any JAX
    computation or device query in a multi-process job; a single-process run never initializes.
    """
    import jax

    options = options or DistributedOptions()
    if jax.distributed.is_initialized():
        return True
    decision = plan(options, environ)
    if decision is None:
        return False
    from jax._src import xla_bridge

    if xla_bridge.backends_are_initialized():
        raise RuntimeError("distributed: the multi-process runtime must start before JAX touches a device "
                           f"({decision.reason}); call sftrl_jax.distributed.initialize() first in the program")
    jax.config.update("jax_cpu_collectives_implementation", options.cpu_collectives)
    log.info("starting the distributed runtime (%s): coordinator %s, %s processes, process id %s",
             decision.reason, decision.coordinator_address or "auto", decision.num_processes or "auto",
             decision.process_id if decision.process_id is not None else "auto")
    try:
        jax.distributed.initialize(coordinator_address=decision.coordinator_address,
                                   num_processes=decision.num_processes, process_id=decision.process_id,
                                   local_device_ids=decision.local_device_ids,
                                   initialization_timeout=options.initialization_timeout)
    except ValueError as err:  # JAX could not complete the settings
        raise ValueError(f"distributed: {err} (set distributed.coordinator_address, distributed.num_processes "
                         f"and distributed.process_id, or {ENV_COORDINATOR_ADDRESS} / {ENV_NUM_PROCESSES} / "
                         f"{ENV_PROCESS_ID})") from None
    log.info("process %d of %d; %d local of %d devices", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def barrier(name: str) -> None:
    """Wait until every process reaches ``name`` (no-op with one process)."""
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def map_rows_across_processes(fn: Callable[..., Sequence], *columns: Sequence,
                              trailing: tuple[int, ...] = ()) -> np.ndarray:
    """``fn(*columns)`` as a float32 array ``[rows, *trailing]``, with the rows split over the processes.

    Process ``p`` calls ``fn`` on its contiguous share of the rows; the results are gathered, so
    every process returns the same full array (e.g. rewards: graded once, identical everywhere).
    Every process must call this with the same number of rows.
    """
    import jax

    count = len(columns[0]) if columns else 0
    processes = jax.process_count()
    if processes == 1:
        return np.asarray(fn(*columns), np.float32).reshape(count, *trailing)
    from jax.experimental import multihost_utils

    bounds = np.linspace(0, count, processes + 1).round().astype(int)
    lo, hi = bounds[jax.process_index()], bounds[jax.process_index() + 1]
    padded = np.zeros((1, max(int(np.diff(bounds).max()), 1), *trailing), np.float32)
    if hi > lo:
        padded[0, :hi - lo] = np.asarray(fn(*(c[lo:hi] for c in columns)), np.float32).reshape(hi - lo, *trailing)
    gathered = np.asarray(multihost_utils.process_allgather(padded, tiled=True))  # [processes, width, ...]
    return np.concatenate([gathered[p, :bounds[p + 1] - bounds[p]] for p in range(processes)])
