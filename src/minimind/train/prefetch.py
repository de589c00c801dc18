"""Build the next steps' batches on a background thread while the current step runs.

The loop's batches are a pure function of the step number (the data order depends only on seed,
epoch and step), so a thread can build them ahead in step order: the stream yields exactly the
batches the synchronous loop would build, in the same order, from any starting step (resume).
On CUDA the thread also copies each batch into page-locked memory, so the trainer's
``to(device, non_blocking=True)`` overlaps with compute instead of blocking on a pageable copy.

What remains visible is the time the step *waited* for its batch (``data_wait``): near zero when
building a batch is faster than a step, the shortfall otherwise.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Callable


class _Failed:
    """A producer exception, handed to the consumer to re-raise in the training thread."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class BatchStream:
    """``make(step)`` for ``step = start .. stop - 1``, built ``depth`` steps ahead on a thread.

    :meth:`next` returns the next step's value and adds the seconds it waited to :attr:`waited`
    (read and reset with :meth:`take_wait`).  :meth:`close` stops the thread (also on errors)."""

    def __init__(self, make: Callable[[int], Any], start: int, stop: int, *, depth: int = 2,
                 pin_memory: bool = False) -> None:
        self._make, self._pin = make, pin_memory
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self.waited = 0.0
        self._thread = threading.Thread(target=self._produce, args=(start, stop), daemon=True,
                                        name="minimind-batches")
        self._thread.start()

    def _produce(self, start: int, stop: int) -> None:
        try:
            for step in range(start, stop):
                item = self._make(step)
                if self._pin:
                    item = [b.pin_memory() if hasattr(b, "pin_memory") else b for b in item]
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
        except BaseException as e:  # noqa: BLE001 -- re-raised in the consumer, with its traceback
            self._queue.put(_Failed(e))

    def next(self) -> Any:
        t0 = time.perf_counter()
        item = self._queue.get()
        self.waited += time.perf_counter() - t0
        if isinstance(item, _Failed):
            self.close()
            raise item.error
        return item

    def take_wait(self) -> float:
        """Seconds waited since the last call."""
        waited, self.waited = self.waited, 0.0
        return waited

    def close(self) -> None:
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
