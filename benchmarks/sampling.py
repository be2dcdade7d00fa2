"""A background thread that calls `sample()` every `period` seconds while a benchmarked command runs."""

from __future__ import annotations

import threading


class PeriodicSampler:
    """Subclasses implement `sample()`; use as a context manager around the measured run."""

    def __init__(self, period: float = 0.2):
        self.period = period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def sample(self) -> bool:
        """Take one sample; return False to stop sampling."""
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set() and self.sample() is not False:
            self._stop.wait(self.period)
