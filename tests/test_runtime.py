"""Process setup shared by the pipelines (components/runtime.py), in the workers of a real local Ray."""

from __future__ import annotations

import inspect
import logging

import ray
from ray.train.v2._internal.execution.controller import placement_group_cleaner

from components.runtime import _CLEANER_LOGGER, _CLEANER_WARNING


@ray.remote
def cleaner_messages_that_get_through() -> list[str]:
    """In a Ray worker: log the placement-group cleaner's state-API warning and its real warning through the
    cleaner's own logger; return what reached a handler."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger(_CLEANER_LOGGER)
    handler = Collect()
    logger.addHandler(handler)
    try:
        logger.warning(f"{_CLEANER_WARNING}. State API may be temporarily unavailable. Continuing to monitor.")
        logger.warning("Detected that the Ray Train controller actor (abc) is dead.")
    finally:
        logger.removeHandler(handler)
    return seen


def test_embedded_rays_workers_drop_only_the_cleaners_state_api_warning(ray_session):
    # The names the filter relies on are Ray's own: a Ray that renames them fails here, not silently in users' logs.
    assert placement_group_cleaner.logger.name == _CLEANER_LOGGER
    assert _CLEANER_WARNING in inspect.getsource(placement_group_cleaner)
    assert ray.get(cleaner_messages_that_get_through.remote()) == [
        "Detected that the Ray Train controller actor (abc) is dead."]
