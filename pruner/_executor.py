"""Where a run's expensive parts run: the executor.

A run spends its time running models over rows of the eval set: the baseline, every
candidate of the search, the label-free probes, and the calibration pass. Each of these
goes through :class:`Executor`:

* :meth:`Executor.outputs` runs one model over pieces of rows (each a whole number of
  batches) and yields each piece's outputs in order; the caller computes the metric from
  them exactly as before, so where the pieces ran does not change a single bit of it (AUC or
  mAP do not decompose into per-shard metrics; outputs do).
* :meth:`Executor.outputs_many` does the same for several models over the same pieces (the
  candidates of one round of a k-section search): a cluster runs them at once, this process
  one after the other.
* :meth:`Executor.map_model` runs a task with a session of one model over parts of the
  eval set: the calibration pass, per shard, whose statistics the caller reduces.

:class:`LocalExecutor` (the default) runs both here, one piece after the other, which is
the run as it always was. ``pruner._ray.RayExecutor`` shards them over the workers of a Ray
cluster (see ``docs/ray.md``).
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from ._options import Executor as ExecutorKind

if TYPE_CHECKING:
    import onnxruntime as ort

    from ._evalset import EvalSet
    from ._evaluate import Batches, Runner
    from ._options import PruneOptions

__all__ = ["Executor", "LocalExecutor", "make_executor"]

T = TypeVar("T")
R = TypeVar("R")


class Executor:
    """Runs models over the eval set: here (:class:`LocalExecutor`) or on a cluster."""

    workers = 1
    """How many pieces run at once."""

    def outputs(
        self, batches: Batches, runner: Runner, pieces: Sequence[np.ndarray]
    ) -> Generator[np.ndarray, None, None]:
        """``runner``'s output for each of ``pieces`` (row indices, each a whole number of
        ``batches.batch_size`` batches but the last), in order. Stop consuming (close the
        generator) to abandon the rest."""
        for piece in pieces:
            yield batches.outputs(runner, piece)

    def outputs_many(
        self, batches: Batches, jobs: Sequence[tuple[Callable[[], Runner], Sequence[np.ndarray]]]
    ) -> list[Generator[np.ndarray, None, None]]:
        """:meth:`outputs` for each job, a ``(make_runner, pieces)`` pair, as one generator each.

        Consume them in order, each to its end or until closed (an early stop of that job alone);
        close them all when done. Here a job's runner is made when its generator starts and its
        pieces run as it is consumed: exactly :meth:`outputs` of one job after the other, with
        one candidate's weights in memory at a time. A cluster makes every runner at once and
        runs the jobs' pieces together, so the workers one job cannot fill run the next ones.
        """

        def one(make: Callable[[], Runner], pieces: Sequence[np.ndarray]) -> Generator[np.ndarray, None, None]:
            yield from self.outputs(batches, make(), pieces)

        return [one(make, pieces) for make, pieces in jobs]

    def prepare(self, batches: Batches, runner: Runner) -> None:
        """Get ``runner`` ready where its pieces will run, without waiting: a cluster sends its model
        to every worker and makes the session there while this process goes on (the final check
        overlaps the checker with it). Here, nothing: the session is made on the first piece."""

    @property
    def remote(self) -> bool:
        """Whether work goes elsewhere (then :meth:`map_model` is worth its transfers)."""
        return False

    def map_model(
        self, batches: Batches, model: bytes, task: Callable[[ort.InferenceSession, EvalSet, T], R], parts: Sequence[T]
    ) -> Iterator[R]:
        """``task(session, evalset, part)`` for each of ``parts``, in order, with a session of
        ``model`` (one intra-op thread on a worker) and the eval set of ``batches``. ``task`` must
        be picklable (a module-level function or a ``functools.partial`` of one)."""
        from ._evaluate import make_session  # the evaluation module imports this one

        session = make_session(model, threads=0)
        for part in parts:
            yield task(session, batches.evalset, part)

    def close(self) -> None:
        """Release the workers (nothing to do here)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """This process, on onnxruntime's own threads: the run as it always was."""


def make_executor(options: PruneOptions) -> Executor:
    """The executor ``options`` ask for (a Ray one connects to its cluster here)."""
    if options.executor is ExecutorKind.RAY:
        from ._ray import RayExecutor  # the optional extra: imported only when asked for

        return RayExecutor(options.ray_address, options.executor_workers)
    return LocalExecutor()
