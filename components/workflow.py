"""Chained stages with cached results: the orchestration behind pipelines/end_to_end.py.

A stage is a function of its resolved config and its upstream stages' outputs (URIs: shard directories,
`models:/name/version`), returning its own outputs. Its cache key hashes the resolved config and those
upstream outputs, so a re-run skips a stage whose key matches a finished record whose outputs still exist,
and re-runs everything from the first changed or failed stage (a re-run upstream stage registers a new model
version, which changes every downstream key). Records live in `<work_dir>/state.json`, written after every
stage, so a crash loses at most the stage it was in.

Stages run one after another in the driver; each one's work runs on the Ray cluster the driver is attached
to (Ray Data for ingest, scoring and inference, Ray Train for training), so no second orchestrator is needed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from upath import UPath

from components import storage
from components.cache import content_key

Outputs = dict[str, Any]
DONE, FAILED = "done", "failed"
# Keys that change how a stage reports or where it runs, never what it computes.
VOLATILE_KEYS = ("ray", "progress", "mlflow")


@dataclass(frozen=True)
class Stage:
    name: str
    needs: tuple[str, ...]                                   # stages whose outputs this one reads
    config: Callable[[dict[str, Outputs], str], DictConfig]  # (upstream outputs, output dir) -> resolved config
    run: Callable[[DictConfig], Outputs]                     # config -> outputs (JSON-able)
    still_valid: Callable[[Outputs], bool]                   # are a cached run's outputs still there?
    # What the config names but does not hold, as a digest (a URL list's files): it counts in the cache key.
    inputs_digest: Callable[[DictConfig], str] = lambda cfg: ""


class WorkflowError(ValueError):
    pass


class StateFile:
    """{stage: {"key", "status", "outputs" or "error", "seconds", "finished"}} in one JSON file, replaced atomically."""

    def __init__(self, path: str | os.PathLike):
        self.path = UPath(path)  # local or in an object store
        self.records: dict[str, dict[str, Any]] = json.loads(self.path.read_text()) if self.path.is_file() else {}

    def get(self, stage: str) -> dict[str, Any] | None:
        return self.records.get(stage)

    def put(self, stage: str, record: dict[str, Any]) -> None:
        self.records[stage] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        storage.write_text(self.path, json.dumps(self.records, indent=2, default=str))


def cache_key(stage: Stage, cfg: DictConfig, upstream: Mapping[str, Outputs]) -> str:
    settings = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in VOLATILE_KEYS}
    return content_key(stage.name, json.dumps(settings, sort_keys=True, default=str),
                       json.dumps(dict(upstream), sort_keys=True, default=str), stage.inputs_digest(cfg))


def select(stages: Sequence[Stage], names: Sequence[str]) -> list[Stage]:
    known = {stage.name: stage for stage in stages}
    unknown = [name for name in names if name not in known]
    if unknown:
        raise WorkflowError(f"unknown stage(s) {unknown}; the stages are {list(known)}")
    return [stage for stage in stages if stage.name in names]  # always in dependency order


@dataclass
class StageReport:
    name: str
    action: str          # "ran" | "skipped"
    seconds: float
    outputs: Outputs


def run_stages(stages: Sequence[Stage], selected: Sequence[str], state: StateFile, work_dir: UPath,
               force: Sequence[str] = (), on_skip: Callable[[Stage, dict[str, Any]], None] | None = None,
               say: Callable[[str], None] = print) -> list[StageReport]:
    """Run `selected` stages in order, skipping unchanged finished ones (`on_skip(stage, record)` is told).
    Upstream outputs of stages not selected come from earlier runs' records."""
    reports: list[StageReport] = []
    rerun: set[str] = set()  # stages run in this invocation: their dependants run too
    for stage in select(stages, selected):
        upstream = {}
        for need in stage.needs:
            record = state.get(need)
            if record is None or record["status"] != DONE:
                raise WorkflowError(f"stage {stage.name} needs the outputs of {need}, which has not finished: "
                                    f"add {need} to stages=[...]")
            upstream[need] = record["outputs"]
        # The key is taken before the output directory is known (the directory is named by the key).
        key = cache_key(stage, stage.config(upstream, str(work_dir / stage.name / "KEY")), upstream)
        cfg = stage.config(upstream, str(work_dir / stage.name / key))
        record = state.get(stage.name)
        why = ("forced" if stage.name in force else "new" if record is None else
               "last run failed" if record["status"] != DONE else "changed" if record["key"] != key else
               "upstream re-ran" if rerun & set(stage.needs) else
               None if stage.still_valid(record["outputs"]) else "outputs gone")
        if why is None:
            say(f"[end-to-end] {stage.name}: unchanged (key {key}), skipped")
            if on_skip:
                on_skip(stage, record)
            reports.append(StageReport(stage.name, "skipped", 0.0, record["outputs"]))
            continue
        say(f"[end-to-end] {stage.name}: running ({why}; key {key})")
        started = time.perf_counter()
        try:
            outputs = stage.run(cfg)
        except BaseException as error:
            state.put(stage.name, {"key": key, "status": FAILED, "error": f"{type(error).__name__}: {error}",
                                   "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
            raise
        seconds = time.perf_counter() - started
        state.put(stage.name, {"key": key, "status": DONE, "outputs": outputs, "seconds": round(seconds, 1),
                               "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        rerun.add(stage.name)
        reports.append(StageReport(stage.name, "ran", seconds, outputs))
    return reports
