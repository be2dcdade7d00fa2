"""The types of the `model` config group (conf/model/<family>.yaml), checked when Hydra composes the config.

Each family's YAML holds its values and comments and extends its schema here (registered in Hydra's ConfigStore as
`model/<family>_schema`), so `model.preset=3` or `model.font_size=big` fails at parse in one line, before Ray or
MLflow start; a key added with `+` fails in `components.runtime.check_typed_settings` as the pipeline starts.
Choices and ranges (a preset's name, temperature_init in [0.01, 1]) are checked where the model is built
(components/models/factory.py), still before any work.
"""

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class ModelSettings:
    family: str = MISSING
    preset: str = MISSING
    pretrained: Optional[str] = MISSING
    temperature_init: Optional[float] = MISSING
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class FilipSettings(ModelSettings):
    embed_dim: int = MISSING
    token_topk_fraction: Optional[float] = MISSING


@dataclass
class ClippoSettings(ModelSettings):
    text_image_size: Optional[int] = MISSING
    pool: Optional[str] = MISSING
    font_size: int = MISSING
    text_pair_fraction: float = MISSING


MODEL_SCHEMAS = {"clip": ModelSettings, "filip": FilipSettings, "clippo": ClippoSettings}

for family, schema in MODEL_SCHEMAS.items():
    ConfigStore.instance().store(group="model", name=f"{family}_schema", node=schema)
