"""The types of the `trainer` config group, checked when Hydra composes the config.

`conf/trainer/default.yaml` holds every value and its comment; this schema holds the types only (every field
MISSING), so a setting lives in one place. Registered in Hydra's ConfigStore as `trainer/schema`, which the YAML
extends: `trainer.lr=abc` or an unknown `trainer.*` key fails at parse, in one line, before Ray or MLflow start.
A stage's own `<stage>.trainer` settings (AltCLIP's, ClipCap's) are merged onto this typed node, so they are
checked too (`components.runtime.check_typed_settings`).
"""

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig


@dataclass
class AugmentSettings:
    scale: list[float] = field(default_factory=lambda: [MISSING, MISSING])
    hflip: bool = MISSING


@dataclass
class TrainerSettings:
    workers: int = MISSING
    use_gpu: Any = MISSING  # auto | true | false
    cpus_per_worker: float = MISSING
    torch_threads: Optional[int] = MISSING
    samples: int = MISSING
    global_batch: int = MISSING
    grad_accum: int = MISSING
    grad_cache: bool = MISSING
    lr: float = MISSING
    weight_decay: float = MISSING
    warmup_fraction: float = MISSING
    log_every: int = MISSING
    checkpoint_every: int = MISSING
    keep_checkpoints: int = MISSING
    max_failures: int = MISSING
    storage_path: str = MISSING
    resume_from: Optional[str] = MISSING
    preprocess_workers: Optional[int] = MISSING
    local_shuffle_buffer: int = MISSING
    seed: int = MISSING
    activation_checkpointing: bool = MISSING
    compile: Any = MISSING  # auto | true | false
    augment: Optional[AugmentSettings] = MISSING


ConfigStore.instance().store(group="trainer", name="schema", node=TrainerSettings)


def trainer_defaults() -> DictConfig:
    """The trainer group as the pipelines compose it (conf/trainer/default.yaml, typed), for code that runs the loop
    outside a pipeline: tests, benchmarks."""
    from components.stages.wiring import stage_config

    return stage_config("pretrain_clip", []).trainer
