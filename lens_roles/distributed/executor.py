"""A pool of Ray actors that each hold the model, running identified shards of a job.

Each actor loads the model once, when it starts (or restarts), with a
:class:`ModelSpec` — :func:`~lens_roles.runtime.models.load_model` with the name,
device, dtype and ``n_devices`` the driver asked for — or any picklable
zero-argument loader. :meth:`RayExecutor.map` then hands out one shard at a time
to each idle actor (so a worker that dies holds at most one shard), keeps each
shard's result under its index, and returns them in shard order; the caller
merges them (float64 sums and counts, rows in prompt order).

Faults: the actors are created with ``max_restarts``, so Ray replaces a worker
process that dies (its ``__init__`` loads the model again). Ray's own task
retries are left off (``max_task_retries=0``) so that the driver sees each
loss: it logs which shard the dead worker held and re-runs that shard (on
whichever worker is free first), at most ``max_retries`` times; the restarted
worker takes shards again once a probe finds it up with its model loaded. A
shard's result is stored once under its index, so a re-run shard is never
counted twice.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from lens_roles.errors import LensRolesError, ModelError, UsageError
from lens_roles.runtime.models import load_model, model_id
from lens_roles.runtime.progress import progress_bar

log = logging.getLogger("lens_roles.distributed")


def _ray():
    try:
        import ray
    except ImportError:
        raise UsageError("distributed runs need Ray: pip install 'lens-roles[distributed]' (ray==2.60.0)") from None
    return ray


@dataclass(frozen=True)
class ModelSpec:
    """What each worker loads: ``load_model(name, device=device, dtype=dtype, n_devices=n_devices)``.

    ``device="cuda"`` on a worker means the GPU(s) Ray gave that actor
    (``gpus_per_worker``); ``n_devices > 1`` splits the model's layers over that
    many of them (TransformerLens ``n_devices``), for a model larger than one GPU.
    """

    name: str | None = None
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    n_devices: int = 1

    def __call__(self):
        return load_model(self.name, device=self.device, dtype=self.dtype, n_devices=self.n_devices)


class _Worker:
    """The actor body: one model, loaded once; runs ``fn(model, shared, payload)`` per shard."""

    def __init__(self, loader: Callable[[], Any]):
        self.model, self.error = None, None
        try:
            self.model = loader()
        except Exception as exc:  # reported to the driver by describe(), as one clear error
            self.error = f"{type(exc).__name__}: {exc}"

    def describe(self) -> dict:
        if self.model is None:
            return {"error": self.error}
        cfg = self.model.cfg
        return {"model": model_id(self.model), "n_layers": cfg.n_layers, "d_model": cfg.d_model,
                "dtype": str(cfg.dtype), "device": str(cfg.device), "pid": os.getpid()}

    def run(self, fn, shared, payload):
        if self.model is None:
            raise ModelError(f"this worker could not load the model: {self.error}")
        return fn(self.model, shared, payload)

    def pid(self) -> int:
        return os.getpid()


def check_address(address: str) -> None:
    """Raise :class:`UsageError` when nothing listens at a ``host:port`` or ``ray://host:port`` address.

    ``"auto"`` (a cluster started on this machine with ``ray start``) is checked by
    ``ray.init`` itself. The check takes at most 5 seconds, so a wrong address
    fails at once instead of after Ray's long connection timeout.
    """
    if address == "auto":
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UsageError(f"Ray address {address!r} is not host:port, ray://host:port or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=5):
            pass
    except OSError as exc:
        raise UsageError(f"cannot reach a Ray cluster at {address}: {exc} "
                         "(start one with `ray start --head`, or leave the address out for a local one)") from None


class RayExecutor:
    """``workers`` Ray actors that each hold the model; pass as ``executor=`` to collection and builders.

    Args:
        model: a :class:`ModelSpec`, a model name (``None``: the default model,
            on ``device`` in ``dtype``), or any picklable zero-argument callable
            returning a ``HookedTransformer`` (e.g. one that builds a test model).
        workers: number of actors (each with ``cpus_per_worker`` CPUs and
            ``gpus_per_worker`` GPUs).
        address: a running cluster (``"auto"``, ``"host:port"``, ``"ray://host:port"``);
            None uses the Ray session already started (``ray.init()`` in a notebook),
            else ``$RAY_ADDRESS`` when set, else starts a local one (never a stale
            cluster that ``ray start`` once left recorded on this machine).
        shards_per_worker: shards a job is cut into per worker, so fast workers
            take more of them (capped at the job's number of indivisible chunks).
        max_restarts: how often Ray may replace each dead worker.
        max_retries: how often the driver re-runs a shard whose worker died.
        start_timeout: seconds the workers may take to start and load the model.
        init_kwargs: extra ``ray.init`` keywords when this starts Ray.

    Raises:
        UsageError: Ray missing, an unreachable address, a bad count, a cluster
            with fewer free CPUs/GPUs than the workers need, or workers that do not
            start within ``start_timeout``.
        ModelError: a worker could not load the model (its error, once).
    """

    def __init__(self, model: ModelSpec | str | None | Callable = None, *, device: str = "cpu",
                 dtype: torch.dtype = torch.float32, n_devices: int = 1, workers: int = 1,
                 cpus_per_worker: float = 1, gpus_per_worker: float = 0, address: str | None = None,
                 shards_per_worker: int = 4, max_restarts: int = 2, max_retries: int = 2,
                 start_timeout: float = 900, init_kwargs: dict | None = None):
        for name, value, low in (("workers", workers, 1), ("shards_per_worker", shards_per_worker, 1),
                                 ("n_devices", n_devices, 1), ("max_restarts", max_restarts, 0),
                                 ("max_retries", max_retries, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"{name} must be an integer >= {low}, got {value!r}")
        if cpus_per_worker < 0 or gpus_per_worker < 0:
            raise UsageError("cpus_per_worker and gpus_per_worker must be >= 0")
        if n_devices > 1 and gpus_per_worker < n_devices:
            raise UsageError(f"n_devices={n_devices} splits the model over {n_devices} GPUs per worker: "
                             f"set gpus_per_worker to {n_devices} (got {gpus_per_worker})")
        ray = _ray()
        if callable(model) and not isinstance(model, (str, ModelSpec)):
            self.loader = model
        else:
            self.loader = model if isinstance(model, ModelSpec) else ModelSpec(model, device, dtype, n_devices)
        self.workers, self.shards_per_worker, self.max_retries = workers, shards_per_worker, max_retries
        if not ray.is_initialized():
            if address is None:
                address = os.environ.get("RAY_ADDRESS") or "local"
            if address != "local":
                check_address(address)
            try:
                ray.init(address=address, **(init_kwargs or {}))
            except ConnectionError as exc:
                raise UsageError(f"cannot connect to a Ray cluster at {address}: {exc}") from None
        have, free = ray.cluster_resources(), ray.available_resources()
        for resource, each in (("CPU", cpus_per_worker), ("GPU", gpus_per_worker)):
            if each and free.get(resource, 0) < each * workers - 1e-9:  # the actors would wait forever
                raise UsageError(f"{workers} workers × {each:g} {resource} need {each * workers:g} {resource}s, "
                                 f"but the Ray cluster has {free.get(resource, 0):g} free "
                                 f"(of {have.get(resource, 0):g}); use fewer workers or free some")
        actor = ray.remote(_Worker).options(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker,
                                             max_restarts=max_restarts, max_task_retries=0)
        self._actors = [actor.remote(self.loader) for _ in range(workers)]
        from ray.exceptions import GetTimeoutError

        try:
            infos = ray.get([a.describe.remote() for a in self._actors], timeout=start_timeout)
        except GetTimeoutError:
            self.close()
            raise UsageError(f"the {workers} Ray worker(s) did not start and load the model within "
                             f"{start_timeout:g} s (free resources now: {ray.available_resources()})") from None
        failed = [(i, info["error"]) for i, info in enumerate(infos) if "error" in info]
        if failed:
            self.close()
            i, error = failed[0]
            raise ModelError(f"{len(failed)} of {workers} Ray worker(s) could not load the model "
                             f"({self.loader!r}); worker {i}: {error}")
        self.info = infos[0]

    # -- the executor contract (lens_roles.runtime.shards) --------------------------------------

    def check(self, model) -> None:
        """Raise :class:`UsageError` when the workers hold another model than ``model``."""
        mine = {"model": model_id(model), "n_layers": model.cfg.n_layers, "d_model": model.cfg.d_model}
        theirs = {k: self.info[k] for k in mine}
        if mine != theirs:
            raise UsageError(f"the Ray workers hold {theirs}, but the driver's model is {mine}")

    def shards(self, n_units: int) -> int:
        """``workers × shards_per_worker`` shards, capped at the ``n_units`` chunks (said in the log)."""
        if n_units < self.workers:
            log.warning("%d Ray workers but only %d chunk(s) of work: running %d shard(s), %d worker(s) idle",
                        self.workers, n_units, n_units, self.workers - n_units)
        return max(1, min(self.workers * self.shards_per_worker, n_units))

    def map(self, fn: Callable, shared: Any, payloads: Sequence[Any], *, desc: str = "shards",
            progress: bool = False) -> list:
        """``[fn(model, shared, p) for p in payloads]`` on the workers, in payload order.

        ``shared`` goes to the object store once. Each idle worker takes the next
        shard; a shard whose worker died is logged and re-run (see the module docs).

        Raises:
            the lens_roles error a shard raised, as is; UsageError when a shard's
            worker died more than ``max_retries`` times.
        """
        ray = _ray()
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        ref = ray.put(shared)
        pending = deque(range(len(payloads)))
        attempts = [0] * len(payloads)
        results: dict[int, Any] = {}
        running: dict[Any, tuple[int, int | None]] = {}  # ref -> (worker, shard), shard None: a health probe
        idle = deque(range(len(self._actors)))
        lost: set[int] = set()  # workers Ray could not bring back
        with progress_bar(progress, len(payloads), desc, unit="shard") as bar:
            while pending or any(s is not None for _, s in running.values()):
                while pending and idle:
                    w, s = idle.popleft(), pending.popleft()
                    attempts[s] += 1
                    running[self._actors[w].run.remote(fn, ref, payloads[s])] = (w, s)
                if not running:
                    raise UsageError(f"every Ray worker died for good ({len(lost)} lost); {len(pending)} shard(s) "
                                     "left undone (raise max_restarts, or look at the workers' logs)")
                done, _ = ray.wait(list(running), num_returns=1)
                for r in done:
                    w, s = running.pop(r)
                    try:
                        out = ray.get(r)
                    except RayTaskError as exc:
                        cause = getattr(exc, "cause", None)
                        if isinstance(cause, LensRolesError):
                            raise cause from None
                        raise
                    except RayActorError as exc:  # the worker died (ActorUnavailableError: it is restarting)
                        if s is None:  # a probe: ask again while it restarts; else it is dead for good
                            if isinstance(exc, ActorUnavailableError):
                                time.sleep(0.5)
                                running[self._actors[w].describe.remote()] = (w, None)
                            else:
                                lost.add(w)
                            continue
                        if attempts[s] > self.max_retries:
                            raise UsageError(f"shard {s}: its Ray worker died {attempts[s]} times; giving up "
                                             f"(last: {str(exc).splitlines()[0][:200]})") from None
                        log.warning("Ray worker %d died while holding shard %d (attempt %d); re-running shard %d",
                                    w, s, attempts[s], s)
                        pending.appendleft(s)
                        # the worker takes shards again once Ray has restarted it (it reloads the model)
                        running[self._actors[w].describe.remote()] = (w, None)
                        continue
                    if s is None:
                        if "error" in out:  # restarted, but could not load the model this time
                            raise ModelError(f"Ray worker {w} restarted but could not load the model: {out['error']}")
                        idle.append(w)
                        continue
                    idle.append(w)
                    if s not in results:  # a shard is counted once, however often it ran
                        results[s] = out
                        bar.update(1)
        return [results[s] for s in range(len(payloads))]

    def pids(self, timeout: float = 300) -> list[int]:
        """The worker processes' ids (for diagnostics and fault tests), waiting for restarting workers."""
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + timeout
        while True:
            try:
                return _ray().get([a.pid.remote() for a in self._actors])
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def close(self) -> None:
        """Stop the workers (the Ray session itself stays up)."""
        ray = _ray()
        for a in getattr(self, "_actors", []):
            ray.kill(a, no_restart=True)
        self._actors = []

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
