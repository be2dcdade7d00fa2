"""clipforge: ingest, train, evaluate and caption the CLIP family on Ray + DeepSpeed, tracked in MLflow."""

import os

# Libraries that phone home on import (albumentations, via img2dataset) must not: a pipeline makes no
# traffic it was not asked to. Set before any of them is imported; Ray workers get it via runtime_env.
QUIET_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "DO_NOT_TRACK": "1"}
for _name, _value in QUIET_ENV.items():
    os.environ.setdefault(_name, _value)
