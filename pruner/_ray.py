"""The Ray executor: a run's model runs sharded over the workers of a Ray cluster.

Needs the optional ``ray`` extra (``pip install 'onnx-pruner[ray]'``); ``ray`` is imported
only when this executor is made. Every worker is a Ray actor holding one CPU and running
onnxruntime on one intra-op thread; it keeps the sessions it made (the fed model's for the
whole run, the latest candidates') so a candidate's model is loaded once per worker.

What goes through the object store, once each: the eval set (with the batching settings),
the fed model (the split model with its weights as inputs) and then each candidate's
weights, or each candidate's serialized model where candidates run as built sessions; at the
end, the written model's bytes, of which every worker makes a fresh session for the final check.
Pieces of rows go out in order, a few per worker at a time; their outputs come back in
order and the driver computes the metric from them as the local executor does, so the
values are the same to the bit (see ``docs/ray.md``).

Pieces an early stop leaves queued are skipped by the workers (the call is marked abandoned
in Ray's key-value store), not cancelled. A worker that dies has its pieces run again on the
others; when none is left the run fails with a :class:`ResourceLimitError` that says so, never
a hang.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import logging
import os
import threading
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import onnxruntime as ort

from ._errors import InvalidConfigError, PrunerError, ResourceLimitError, check_stop
from ._evalset import EvalSet
from ._evaluate import Batches, PortableRunner, Runner, make_session, session_runner
from ._executor import Executor

__all__ = ["RayExecutor", "ray_module"]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

IN_FLIGHT = 2
"""Tasks queued per worker: one running and one ready, so a worker never waits for the driver,
and an early stop abandons at most this many per worker."""
WINDOW = 4
"""Tasks sent and not yet read, per live worker: how far a fast worker may run ahead of the
task the driver waits for (their outputs wait in the object store until read)."""
WAIT_SECONDS = 0.5
"""How often the driver checks the stop event while it waits for a worker."""
SESSIONS_KEPT = 2
"""Candidate sessions a worker keeps (the current one, and the one before for a re-run)."""


def ray_module() -> Any:
    """The ``ray`` package, or a clear error when the extra is not installed."""
    try:
        import ray
    except ImportError as e:
        raise InvalidConfigError(
            "executor ray needs the ray extra: pip install 'onnx-pruner[ray]' (or use executor local)"
        ) from e
    return ray


class _Worker:
    """A Ray actor: runs pieces of the eval set through the candidates' sessions, one thread."""

    def __init__(self) -> None:
        self.batches: dict[str, Batches] = {}
        self.fed: dict[str, ort.InferenceSession] = {}
        self.sessions: collections.OrderedDict[str, Runner] = collections.OrderedDict()
        self.rows = 0

    def pid(self) -> int:
        return os.getpid()

    def rows_run(self) -> int:
        return self.rows

    def _batches(self, ref: list[Any]) -> Batches:
        key = ref[0].hex()
        if key not in self.batches:
            self.batches = {key: ray_module().get(ref[0])}
        return self.batches[key]

    def _runner(self, spec: tuple[Any, ...]) -> Runner:
        ray = ray_module()
        kind, output, refs = spec
        key = ":".join(r.hex() for r in refs)
        if key in self.sessions:
            self.sessions.move_to_end(key)
            return self.sessions[key]
        if kind == "model":
            run = session_runner(make_session(ray.get(refs[0]), threads=1), output)
        else:
            fed_key = refs[0].hex()
            if fed_key not in self.fed:
                self.fed = {fed_key: make_session(ray.get(refs[0]), threads=1)}
            session, weights = self.fed[fed_key], dict(ray.get(refs[1]))

            def run(feeds: Any) -> np.ndarray:
                return np.asarray(session.run([output], {**feeds, **weights})[0])

        self.sessions[key] = run
        while len(self.sessions) > SESSIONS_KEPT:
            self.sessions.popitem(last=False)
        return run

    def prepare(self, spec: tuple[Any, ...]) -> None:
        """Make ``spec``'s session now, ahead of its pieces (an actor runs its tasks in order). A
        model that cannot be loaded fails its first piece instead, with the error in full."""
        with contextlib.suppress(Exception):
            self._runner(spec)

    def outputs(
        self, batches: list[Any], spec: tuple[Any, ...], rows: np.ndarray, call: str | None = None
    ) -> np.ndarray | None:
        if call is not None and _abandoned(call):
            return None  # its evaluation stopped early: the driver reads no more of it
        out = self._batches(batches).outputs(self._runner(spec), rows)
        self.rows += len(rows)
        return out

    def map_model(
        self, batches: list[Any], model: list[Any], task: Callable[..., Any], part: Any, blas_threads: int | None
    ) -> Any:
        session = make_session(ray_module().get(model[0]), threads=1)
        with _blas_threads(blas_threads):
            return task(session, self._batches(batches).evalset, part)


ABANDONED = "onnx-pruner-abandoned"
"""The Ray key-value namespace where a driver marks the calls whose remaining pieces it will not read."""


def _abandoned(call: str) -> bool:
    """Whether the driver gave up on ``call`` (a key-value lookup; False when it cannot be asked)."""
    try:
        from ray.experimental import internal_kv

        return bool(internal_kv._internal_kv_exists(call, namespace=ABANDONED))
    except Exception:  # an optimisation only: the piece runs, as it would without the mark
        return False


def _blas_threads(count: int | None) -> contextlib.AbstractContextManager[Any]:
    """numpy's BLAS on ``count`` threads: OpenBLAS splits a product's sums by its thread count, so
    a Gram matrix is the driver's to the bit only on as many threads as the driver's (Ray starts
    workers with one)."""
    if count is None:
        return contextlib.nullcontext()
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=count, user_api="blas")


def blas_threads() -> int | None:
    """This process's BLAS thread count (None when threadpoolctl is missing or finds no BLAS)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    counts = [int(i["num_threads"]) for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(counts) if counts else None


class RayExecutor(Executor):
    """Runs pieces of the eval set on a Ray cluster's workers (see the module docstring).

    Args:
        address: the cluster (``host:port`` of a head, or ``ray://...``); None connects to the
            one this process already joined, or starts a local one.
        workers: actors to start, one CPU each; 0: one per CPU of the cluster.
    """

    def __init__(self, address: str | None, workers: int = 0) -> None:
        ray = self.ray = ray_module()
        self._owned = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                raise InvalidConfigError(f"cannot connect to the Ray cluster at {address or 'local'}: {e}") from e
            self._owned = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.workers = workers or max(1, cpus)
        if self.workers > cpus:
            if self._owned:
                ray.shutdown()
            raise InvalidConfigError(
                f"executor_workers {self.workers} is more than the Ray cluster's {cpus} CPU(s): "
                "each worker takes one, and the extra ones would never start"
            )
        # the workers start together or not at all (a placement group: gang scheduling): two runs
        # sharing a cluster, each holding some of the CPUs its other workers wait for, would
        # otherwise both wait for ever; a run whose group cannot be placed yet waits for it, its
        # stop (cancel, time limit) checked
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self._group = placement_group([{"CPU": 1}] * self.workers, strategy="SPREAD")
        actor = ray.remote(num_cpus=1, max_restarts=0, max_task_retries=0)(_Worker)
        self._actors = [
            actor.options(
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=i)
            ).remote()
            for i in range(self.workers)
        ]
        self._live = list(range(self.workers))
        self._shipped: dict[int, tuple[Any, list[Any]]] = {}
        self._specs: collections.OrderedDict[int, tuple[Any, tuple[Any, ...]]] = collections.OrderedDict()
        self._fed: dict[int, tuple[Any, Any]] = {}
        self._run_id = uuid.uuid4().hex
        self._calls = itertools.count()
        self._abandoned: list[str] = []
        logger.debug("ray executor: %d worker(s) on a cluster of %d CPU(s)", self.workers, cpus)

    @property
    def remote(self) -> bool:
        return True

    def pids(self) -> list[int]:
        """The worker processes' ids (tests kill one)."""
        return [self.ray.get(self._actors[i].pid.remote()) for i in self._live]

    def rows_run(self) -> list[int]:
        """Rows each live worker has run through a model so far (where the work went)."""
        return [self.ray.get(self._actors[i].rows_run.remote()) for i in self._live]

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for actor in self._actors:
            self.ray.kill(actor)
        with contextlib.suppress(Exception):  # a cluster already gone
            remove_placement_group(self._group)
        self._forget_abandoned()
        self._actors, self._live = [], []
        self._shipped.clear()
        self._specs.clear()
        self._fed.clear()
        if self._owned:
            self.ray.shutdown()

    # -- what goes to the object store, once ----------------------------------------------------

    def _batches_ref(self, batches: Batches) -> list[Any]:
        shipped = self._shipped.get(id(batches))
        if shipped is None or shipped[0] is not batches:
            shipped = (batches, [self.ray.put(batches.shippable())])
            self._shipped = {id(batches): shipped}
        return shipped[1]

    def _spec(self, runner: PortableRunner) -> tuple[Any, ...]:
        cached = self._specs.get(id(runner))
        if cached is not None and cached[0] is runner:
            return cached[1]
        ray = self.ray
        if runner.fed is not None:
            fed = self._fed.get(id(runner.fed))
            if fed is None or fed[0] is not runner.fed:
                fed = (runner.fed, ray.put(runner.fed.model))
                self._fed = {id(runner.fed): fed}
            spec: tuple[Any, ...] = ("fed", runner.output, [fed[1], ray.put(dict(runner.weights or {}))])
        else:
            spec = ("model", runner.output, [ray.put(runner.model_bytes())])
        # only the current candidate's: its weights (and their copy in the store) stay alive with it
        self._specs = collections.OrderedDict({id(runner): (runner, spec)})  # held: its id is not reused
        return spec

    # -- running pieces --------------------------------------------------------------------------

    def prepare(self, batches: Batches, runner: Runner) -> None:
        if isinstance(runner, PortableRunner) and runner.portable:
            spec = self._spec(runner)
            for worker in self._live:
                self._actors[worker].prepare.remote(spec)  # no result: it only warms the worker

    def outputs(
        self, batches: Batches, runner: Runner, pieces: Sequence[np.ndarray]
    ) -> Generator[np.ndarray, None, None]:
        if not isinstance(runner, PortableRunner) or not runner.portable or not pieces:
            yield from super().outputs(batches, runner, pieces)
            return
        wave = _Wave(self, batches.stop)
        wave.add_batches(0, self._batches_ref(batches), self._spec(runner), pieces, batches.batch_size)
        yield from wave.stream(0)

    def outputs_many(
        self, batches: Batches, jobs: Sequence[tuple[Callable[[], Runner], Sequence[np.ndarray]]]
    ) -> list[Generator[np.ndarray, None, None]]:
        made = [(make(), pieces) for make, pieces in jobs]
        if not all(isinstance(runner, PortableRunner) and runner.portable for runner, _ in made):
            return super().outputs_many(batches, [(_given(runner), pieces) for runner, pieces in made])
        shipped = self._batches_ref(batches)
        wave = _Wave(self, batches.stop)
        for job, (runner, pieces) in enumerate(made):
            assert isinstance(runner, PortableRunner)
            # held by the wave's tasks: every job's weights stay in the store
            wave.add_batches(job, shipped, self._spec(runner), pieces, batches.batch_size)
        return [wave.stream(job) for job in range(len(made))]

    def map_model(
        self, batches: Batches, model: bytes, task: Callable[[ort.InferenceSession, EvalSet, T], R], parts: Sequence[T]
    ) -> Iterator[R]:
        shipped, sent, threads = self._batches_ref(batches), [self.ray.put(model)], blas_threads()
        wave = _Wave(self, batches.stop)
        for k, part in enumerate(parts):
            wave.add(0, k, functools.partial(_map_model, shipped, sent, task, part, threads))
        return wave.results(0)

    def _call(self) -> str:
        """A new call id: what the workers look up to skip the pieces of an abandoned one."""
        return f"{self._run_id}:{next(self._calls)}"

    def _abandon(self, call: str) -> None:
        """Mark ``call`` abandoned: its pieces still queued on a worker return at once instead of
        running (an early stop left them). They are not cancelled: cancelling a queued actor task
        leaves a gap in the actor's task order that stalls it for 30 s. Only their unread results
        change: the run's figures are the same either way."""
        try:
            from ray.experimental import internal_kv

            internal_kv._internal_kv_put(call, b"1", namespace=ABANDONED)
        except Exception as e:  # an optimisation only: the pieces then run to the end, unread
            logger.debug("could not mark call %s abandoned: %s", call, e)
            return
        self._abandoned.append(call)

    def _forget_abandoned(self) -> None:
        try:
            from ray.experimental import internal_kv

            for call in self._abandoned:
                internal_kv._internal_kv_del(call, namespace=ABANDONED)
        except Exception as e:
            logger.debug("could not remove the abandoned marks: %s", e)
        self._abandoned.clear()

    def _lost(self, worker: int, error: BaseException) -> None:
        if worker in self._live:
            self._live.remove(worker)
            logger.warning(
                "Ray worker %d died (%s); its pieces run again on the %d left",
                worker,
                str(error).splitlines()[0] if str(error) else type(error).__name__,
                len(self._live),
            )


def _result(ray: Any, ref: Any, stop: threading.Event | None) -> Any:
    """A task's result, waited for with the run's stop checked every ``WAIT_SECONDS``. An error of
    ours raised on the worker comes back as itself; a dead worker is ``RayActorError`` (the
    caller sends its pieces again)."""
    ready: list[Any] = []
    while not ready:
        check_stop(stop)
        ready, _ = ray.wait([ref], timeout=WAIT_SECONDS)
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, PrunerError):
            raise cause from e
        raise


def _given(runner: Runner) -> Callable[[], Runner]:
    return lambda: runner


def _map_model(shipped: list[Any], sent: list[Any], task: Any, part: Any, threads: int | None, actor: Any) -> Any:
    return actor.map_model.remote(shipped, sent, task, part, threads)


def _outputs(shipped: list[Any], spec: tuple[Any, ...], rows: np.ndarray, call: str, actor: Any) -> Any:
    return actor.outputs.remote(shipped, spec, rows, call)


class _Wave:
    """The tasks of one or more jobs (one evaluation's batches, the candidates of a k-section
    round, the final check's parts), run on the workers as they free up; each job's results are
    read in order.

    Tasks go out in order, job after job, each to the live worker with the fewest unfinished
    tasks, while some worker has fewer than ``IN_FLIGHT`` unfinished and fewer than ``WINDOW`` per
    live worker are sent and unread; the task a reader waits for always goes out. So a worker that
    runs faster (a lighter node, no driver beside it) takes more of the tasks, instead of every
    worker taking its share in turn and the fast ones waiting for the slowest; and the workers one
    job leaves idle (fewer batches than workers, or its last ones) run the next job's. Which worker
    ran a task changes nothing in its result.

    Closing a job's stream (an early stop) drops its tasks not yet sent and marks its call
    abandoned, so those already queued on a worker return at once unread (cancelling them would
    stall the actor, see ``RayExecutor._abandon``). A worker that dies has its unread tasks sent
    again to the others.
    """

    def __init__(self, executor: RayExecutor, stop: threading.Event | None) -> None:
        self.executor = executor
        self.ray = executor.ray
        self.stop = stop
        self.tasks: list[tuple[int, int, Callable[[Any], Any]]] = []
        """(job, piece, submit(actor) -> ref), in job order."""
        self.calls: dict[int, str] = {}
        """Job -> its call id, for the jobs whose queued tasks can be skipped."""
        self.out: dict[int, tuple[Any, int]] = {}
        """Task -> (ref, worker): sent, not read, its job not closed."""
        self.busy: dict[Any, int] = {}
        """Ref -> worker: sent and not yet seen finished (a closed job's too: it holds its worker)."""
        self.sent = 0
        """Tasks before this one were sent, or skipped as their job was closed."""
        self.closed: set[int] = set()
        self.turn = 0

    def add(self, job: int, piece: int, submit: Callable[[Any], Any]) -> None:
        self.tasks.append((job, piece, submit))

    def add_batches(
        self, job: int, shipped: list[Any], spec: tuple[Any, ...], pieces: Sequence[np.ndarray], size: int
    ) -> None:
        """``job``: the outputs of ``spec``'s model over ``pieces``, each batch of a piece a task of its
        own so the work spreads evenly (the batches are the local run's, so their outputs are too)."""
        call = self.calls[job] = self.executor._call()
        for k, piece in enumerate(pieces):
            for i in range(0, len(piece), size):
                self.add(job, k, functools.partial(_outputs, shipped, spec, piece[i : i + size], call))

    def _send(self, task: int) -> None:
        live = self.executor._live
        if not live:
            raise ResourceLimitError(
                "every Ray worker of the run died (a node lost, or a worker killed or out of memory); "
                "the run cannot go on: check the cluster (ray status) and run it again"
            )
        load = collections.Counter(self.busy.values())
        # the least loaded worker; among equals, the next in turn
        worker = min((live[(self.turn + k) % len(live)] for k in range(len(live))), key=lambda w: load[w])
        self.turn += 1
        ref = self.tasks[task][2](self.executor._actors[worker])
        self.out[task] = (ref, worker)
        self.busy[ref] = worker

    def _room(self) -> bool:
        live = self.executor._live
        if len(self.out) >= WINDOW * max(1, len(live)):
            return False
        load = collections.Counter(self.busy.values())
        return any(load[w] < IN_FLIGHT for w in live)

    def _fill(self, needed: int) -> None:
        """Send every task up to ``needed``, then more while a worker has room."""
        while self.sent < len(self.tasks):
            task = self.sent
            if task > needed and not self._room():
                return
            if self.tasks[task][0] not in self.closed:
                self._send(task)
            self.sent += 1

    def _settle(self) -> None:
        """Wait up to ``WAIT_SECONDS`` for a sent task to finish; forget every finished one."""
        refs = list(self.busy)
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=WAIT_SECONDS)
        if ready:
            ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
            for ref in ready:
                del self.busy[ref]

    def result(self, task: int) -> Any:
        self._fill(task)
        while True:
            ref, worker = self.out[task]
            check_stop(self.stop)
            if ref in self.busy:
                self._settle()  # a worker that frees up meanwhile gets the next task
                self._fill(task)
                continue
            try:
                result = _result(self.ray, ref, self.stop)
            except self.ray.exceptions.RayActorError as e:
                self.executor._lost(worker, e)
                self.busy = {r: w for r, w in self.busy.items() if w != worker}
                for again in sorted(t for t, (_, w) in self.out.items() if w == worker):
                    self._send(again)
                continue
            del self.out[task]
            return result

    def close(self, job: int, *, finished: bool) -> None:
        self.closed.add(job)
        for task in [t for t in self.out if self.tasks[t][0] == job]:
            del self.out[task]  # left to finish, unread (skipped by the worker once abandoned)
        if not finished and job in self.calls:
            self.executor._abandon(self.calls[job])

    def _read(self, job: int) -> Generator[tuple[bool, Any], None, None]:
        """``job``'s results in order, each with whether it ends its piece; closes the job at the end."""
        mine = [t for t, (j, _, _) in enumerate(self.tasks) if j == job]
        read = 0
        try:
            for n, task in enumerate(mine):
                result = self.result(task)
                read = n + 1
                yield n + 1 == len(mine) or self.tasks[mine[n + 1]][1] != self.tasks[task][1], result
        finally:
            self.close(job, finished=read == len(mine))

    def results(self, job: int) -> Generator[Any, None, None]:
        """``job``'s results, one a task, in order."""
        reader = self._read(job)
        try:
            for _, result in reader:
                yield result
        finally:
            reader.close()

    def stream(self, job: int) -> Generator[np.ndarray, None, None]:
        """``job``'s outputs, a piece at a time (its batches' outputs joined)."""
        reader = self._read(job)
        try:
            parts: list[np.ndarray] = []
            for last, out in reader:
                parts.append(out)
                if last:
                    yield np.concatenate(parts)
                    parts = []
        finally:
            reader.close()
