"""A read/write lock for a pipeline's weights: runs read them together, a LoRA change rewrites them alone."""

from __future__ import annotations

import threading
from contextlib import contextmanager


class ReadWriteLock:
    """Many readers or one writer: edits and generations read the weights together, a LoRA change rewrites them
    in place only when no run is using them (and no run starts until it is done)."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0  # a waiting writer holds new readers back: it is never starved

    @contextmanager
    def reading(self):
        with self._cond:
            self._cond.wait_for(lambda: not self._writing and not self._writers_waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def writing(self):
        with self._cond:
            self._writers_waiting += 1
            self._cond.wait_for(lambda: not self._writing and self._readers == 0)
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()
