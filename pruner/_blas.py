"""numpy's BLAS thread count during a run: one, for speed and reproducible bits."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from threadpoolctl import threadpool_limits

__all__ = ["one_blas_thread"]


class _OneBlasThread:
    """numpy's BLAS on one thread while any run of this process is going (``prune`` holds it from
    start to end), and while a calibration pass called on its own computes its statistics.

    Calibration's products are many and small (a batch's rows of one layer; a depthwise conv's
    one per channel): OpenBLAS's hand-off to its second thread cost more than it gave, 10x on
    the depthwise Gram matrices with other processes on the cores (ppocr_cls at load 6: 7.4
    plain passes of calibration on two threads, 2.0 on one). One thread is also the count Ray's
    workers run, so a shard's sums stay the driver's to the bit. The limit is process-wide and
    counted, so that concurrent runs (the server's in-process calls) restore the count only when
    the last of them leaves; and as every run holds it whole, every product of every run is on
    one thread whatever else the process runs: OpenBLAS's sums differ in the last bits between
    thread counts, so a run alone and a run beside others give the same weights to the bit.
    (OpenBLAS's ``openblas_set_num_threads_local`` is no way out: it changed another thread's
    bits too.) What one thread costs: the large refits' products (a 1536 x 1536 Cholesky) use
    one core of an idle machine instead of two."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._limit: contextlib.AbstractContextManager[object] | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._users == 0:
                self._limit = threadpool_limits(limits=1, user_api="blas")
            self._users += 1
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if self._users == 0 and self._limit is not None:
                    self._limit.__exit__(None, None, None)
                    self._limit = None


one_blas_thread = _OneBlasThread()
"""``with one_blas_thread():`` numpy's BLAS on one thread (counted: see the class)."""
