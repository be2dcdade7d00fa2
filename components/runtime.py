"""Process setup shared by the pipeline scripts: Ray (embedded locally or the cluster), paths."""

from __future__ import annotations

import atexit
import contextlib
import gc
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import ray
from hydra.utils import to_absolute_path
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from components import QUIET_ENV
from components.data.settings import IngestSettings
from components.models.settings import MODEL_SCHEMAS
from components.train.settings import TrainerSettings

# A pipeline process ends with a garbage collection over every object torch, Ray and MLflow created: seconds on a
# small machine, freeing nothing the exit would not. Frozen objects are left out of it.
atexit.register(gc.freeze)


# Above its soft limit of worker processes (by default one per CPU) Ray kills a worker idle for one second. A run
# of Ray Train holds about ten processes (controller, workers, data coordinators) beside its data tasks, so with the
# default every run, and every stage of a chain, started its data workers anew and paid their imports again: on two
# cores 13 s more per training run (two 10-step runs in one process: the second took 42.6 s, 28.3 s with warm
# workers). Idle workers are kept warm instead, three per CPU.
WARM_WORKERS_PER_CPU = 3

# Ray Train's controller, as it runs on an embedded Ray (one machine, ended with this process). It polls its
# workers every 2 s by default, so a run's end was seen 2 s late; a poll is one local RPC. Its preemption watcher
# (one more actor process per run) watches for cloud nodes being reclaimed, which one machine has none of.
# Together 2.3-4 s less per training run on two cores (three 10-step runs: 4.9 s from the last step to the
# driver's export, 2.6 s with these). Variables set by the user win; Ray Train passes them to its controller.
EMBEDDED_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}

# Ray Data reads Parquet footers on a pool of actors before it reads a row: 32 by default, sized for a cluster
# with many files. Each actor is a Python process of its own, so on one machine every read_parquet (each
# evaluation, cache read and shard scan) paid several process start-ups for a few footers: on two cores five reads
# of a small file took 23.0 s with the machine busy throughout, 7.1 s with one actor (benchmarks/ray_data_reads.py).
# One actor's threads (128 by default) read a machine's footers concurrently.
EMBEDDED_DATA_ENV = {"RAY_DATA_PARQUET_FOOTER_NUM_ACTORS": "1"}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to `address` / RAY_ADDRESS (e.g. under `ray job submit`), else start Ray inside this process."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)  # a submitted job brings its own runtime_env (see cluster/)
    else:
        for name, value in {**EMBEDDED_TRAIN_ENV, **EMBEDDED_DATA_ENV}.items():
            os.environ.setdefault(name, value)
        cpus = num_cpus or os.cpu_count() or 1
        ray.init(num_cpus=num_cpus, include_dashboard=False,
                 runtime_env={"env_vars": QUIET_ENV, "worker_process_setup_hook": "components.runtime.quiet_workers"},
                 _system_config={"num_workers_soft_limit": WARM_WORKERS_PER_CPU * cpus})
    # Our own tqdm bars report parts and shards; Ray Data's per-operator bars would interleave with them.
    ray.data.DataContext.get_current().enable_progress_bars = False


# Ray Train's placement-group cleaner asks the state API, which the dashboard serves, once a second whether the
# train controller still lives, and warns on every failed ask. The embedded Ray runs without a dashboard (its cost
# buys nothing on one machine, where the cluster ends with this process and its placement groups with it), so
# the warning would fill a run's output: 137 of 187 lines in a 200-step run.
_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_CLEANER_WARNING = "Failed to query Ray Train Controller actor state"


def quiet_workers() -> None:
    """worker_process_setup_hook of the embedded Ray: drop the cleaner's state-API warning (see above)."""
    logging.getLogger(_CLEANER_LOGGER).addFilter(lambda record: not record.getMessage().startswith(_CLEANER_WARNING))


def route_overrides(argv: list[str], routes: dict[str, str], conf_dir: Path, keep_choices: tuple[str, ...] = ()
                    ) -> list[str]:
    """Let `name=value` on the command line mean a value where `name` is also a Hydra config group.

    Hydra reads `data=...` as a choice of conf/data/*.yaml; for `python pipelines/evaluate.py data=<shard dir>`
    the argument becomes `routes[name]=value` instead, unless `name` is in `keep_choices` and the value names
    one of its group's options (then it stays a group choice: `data=emoji_local`)."""
    routed = []
    for arg in argv:
        name, sep, value = arg.partition("=")
        if sep and name in routes and not (name in keep_choices and (conf_dir / name / f"{value}.yaml").is_file()):
            arg = f"{routes[name]}={value}"
        routed.append(arg)
    return routed


def path(value: str | os.PathLike) -> Path:
    """A config path relative to where the user launched the pipeline (Hydra may change the cwd), for the one
    kind of setting that must be on this machine's filesystem: the built-in corpus' build directory
    (data.corpus_dir), which is rendered here. Every other location may be an object-store URL
    (components/storage.py)."""
    if "://" in str(value):
        raise ValueError(f"{value}: data.corpus_dir is where the built-in corpus is rendered on this machine and takes "
                         "a filesystem path; shards (data.output_dir), exports, tokenizers, work_dir caches, "
                         "checkpoints and outputs take object-store URLs")
    return Path(to_absolute_path(str(value)))


@dataclass
class RaySettings:
    address: Optional[str] = None
    num_cpus: Optional[int] = None


@dataclass
class MlflowSettings:
    experiment: str = MISSING
    run_name: str = MISSING


# The config groups with a typed schema: ingest, trainer and model (registered in Hydra's ConfigStore when their
# modules are imported, above, so their types fail at parse; model's per family), and the runtime group's blocks
# (conf/runtime/default.yaml; its package is the config's root, where a schema would refuse every other key, so
# they are checked here).
TYPED_GROUPS = {"ingest": IngestSettings, "trainer": TrainerSettings, "ray": RaySettings, "mlflow": MlflowSettings}


def check_typed_settings(cfg: DictConfig, *stage_trainers: str) -> None:
    """Check now, before anything starts, what Hydra's parse lets through: keys added past a typed group's schema
    with `+` (Hydra's own hint for an unknown key; the code would silently ignore them), and each stage's own
    trainer settings (`<stage>.trainer`: AltCLIP's, ClipCap's), merged onto the typed trainer group. A wrong type
    or an unknown key is a ValueError naming the setting."""
    checks = [(group, OmegaConf.structured(schema), cfg[group]) for group, schema in TYPED_GROUPS.items()
              if group in cfg]
    if "model" in cfg and cfg.model.get("family") in MODEL_SCHEMAS:
        checks.append(("model", OmegaConf.structured(MODEL_SCHEMAS[cfg.model.family]), cfg.model))
    checks += [(f"{stage}.trainer", cfg.trainer, cfg[stage].trainer) for stage in stage_trainers]
    if "progress" in cfg and not isinstance(cfg.progress, bool):
        raise ValueError(f"progress={cfg.progress!r}: use true or false")
    for name, typed, given in checks:
        try:  # as a plain container: a node of the schema's own type would be merged without its keys checked
            OmegaConf.merge(typed, OmegaConf.to_container(given))
        except OmegaConfBaseException as error:
            raise ValueError(f"{name}: {str(error).splitlines()[0]}") from None


@contextlib.contextmanager
def one_line_errors(stage: str, *errors: type[BaseException]) -> Iterator[None]:
    """Bad input (config, files, data) ends the run with one line on stderr and exit code 2, not a traceback.

    `errors` are the exception types that mean bad input; HYDRA_FULL_ERROR=1 shows the traceback instead."""
    try:
        yield
    except errors as error:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"{stage}: {error}", file=sys.stderr, flush=True)
        sys.exit(2)
