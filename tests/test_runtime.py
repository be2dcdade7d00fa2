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


def test_embedded_ray_keeps_idle_workers_warm_while_a_run_holds_its_actors(ray_session):
    """The worker processes of a burst of data tasks stay alive, their imports done, for the next tasks, even while
    long-lived actors (a Ray Train run's controller, workers and coordinators) hold processes too: with Ray's
    default soft limit (one worker per CPU) the idle workers were killed after a second and every run started its
    data workers anew."""
    import os
    import time

    import psutil

    @ray.remote(num_cpus=0)
    class Holder:  # a controller, a worker, a data coordinator: a process that lives as long as the run
        def pid(self) -> int:
            return os.getpid()

    @ray.remote(num_cpus=0.5)
    def task_pid(hold: float) -> int:
        time.sleep(hold)
        return os.getpid()

    holders = [Holder.remote() for _ in range(4)]
    try:
        held = set(ray.get([h.pid.remote() for h in holders]))
        burst = set(ray.get([task_pid.remote(0.5) for _ in range(8)]))
        assert not held & burst
        time.sleep(2)  # Ray kills a worker idle for longer than 1 s while the pool is above its soft limit
        assert all(psutil.pid_exists(pid) for pid in burst), burst
    finally:  # the session's Ray outlives this test
        for holder in holders:
            ray.kill(holder)


def test_embedded_ray_train_polls_often_and_watches_no_preemption(ray_session):
    """Ray Train's controller on the embedded Ray notices a run's end within 0.25 s and starts no preemption
    watcher (components/runtime.py); the variables are the ones Ray Train reads and passes to its controller."""
    import os

    from ray.train.v2._internal import constants

    from components.runtime import EMBEDDED_TRAIN_ENV

    assert set(EMBEDDED_TRAIN_ENV) == {constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR,
                                       constants.ENABLE_PREEMPTION_WATCHER_ENV_VAR}
    assert set(EMBEDDED_TRAIN_ENV) <= constants.ENV_VARS_TO_PROPAGATE
    assert {name: os.environ.get(name) for name in EMBEDDED_TRAIN_ENV} == EMBEDDED_TRAIN_ENV


def test_embedded_ray_reads_parquet_footers_on_one_actor(ray_session, tmp_path):
    """Ray Data's footer reader pool on the embedded Ray is one actor, not its cluster default of 32 (each one a
    process start-up, several seconds of a small machine per read: components/runtime.py, EMBEDDED_DATA_ENV)."""
    import collections

    import pandas as pd

    def footer_readers() -> int:
        actors = ray._private.state.actors().values()
        return collections.Counter(actor["ActorClassName"] for actor in actors)["FooterReader"]

    pd.DataFrame({"id": range(6)}).to_parquet(tmp_path / "rows.parquet")
    before = footer_readers()
    assert len(ray.data.read_parquet(str(tmp_path / "rows.parquet")).take_all()) == 6
    assert footer_readers() - before == 1
