"""The shipped DeepSpeed configs as the training loop builds an engine from them, in bf16 (as on GPUs), and the
layout a resumed checkpoint needs.

ZeRO-1/2 make every parameter a view into one flat buffer per param group. Where a view starts off a 16-byte
boundary (every bias after the 1-element logit_scale), cuBLASLt cannot use its fused-bias GEMM and each Linear
falls to a slow kernel: 1.5x slower steps on an H200 (BENCHMARKS.md). The check runs on CPU: alignment is
a property of the buffer's layout, whatever the device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, free_port

ENGINE_LAYOUT = r"""
import json, os, sys
import torch, torch.distributed as dist, yaml
dist.init_process_group("gloo", rank=0, world_size=1)
import deepspeed
from components.models.factory import build_model
from components.train.loop import deepspeed_config, param_groups, scalars_as_vectors

report = {}
for name, alignment in json.loads(sys.argv[1]):
    config = yaml.safe_load(open(f"conf/deepspeed/{name}.yaml"))
    config["bf16"] = {**config["bf16"], "enabled": True}
    if alignment is not None:
        config["zero_optimization"]["parameter_alignment"] = alignment
    torch.manual_seed(0)
    model = build_model("clip", "tiny", vocab_size=1000)
    scalars_as_vectors(model)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(config, 2, 1))
    misaligned = [n for n, p in model.named_parameters() if p.numel() > 1 and p.data_ptr() % 16]
    report[f"{name}/{alignment}"] = {"misaligned": misaligned, "parameters": len(list(model.parameters())),
                                     "check_grad_overflow": engine.optimizer.check_grad_overflow}
print("LAYOUT " + json.dumps(report))
"""


def engine_layouts(cases: list[tuple[str, bool | None]]) -> dict:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", ENGINE_LAYOUT, json.dumps(cases)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("LAYOUT "))
    return json.loads(line.removeprefix("LAYOUT "))


@pytest.fixture(scope="module")
def layouts() -> dict:
    # The shipped configs, and ZeRO-2 with DeepSpeed's default (no alignment) to show what the setting fixes.
    return engine_layouts([("zero1", None), ("zero2", None), ("zero2", False)])


@pytest.mark.parametrize("name", ["zero1", "zero2"])
def test_shipped_zero_configs_align_every_parameter_and_skip_per_parameter_overflow_checks(layouts, name):
    layout = layouts[f"{name}/None"]
    assert layout["parameters"] > 30
    assert layout["misaligned"] == []
    assert layout["check_grad_overflow"] is False


def test_without_parameter_alignment_the_biases_after_logit_scale_are_misaligned(layouts):
    misaligned = layouts["zero2/False"]["misaligned"]
    assert any(name.endswith(".bias") for name in misaligned), misaligned


def test_a_resumed_checkpoint_keeps_the_layout_it_was_saved_with():
    from components.train.loop import resumable_layout

    shipped = {"zero_optimization": {"stage": 2, "parameter_alignment": True}, "gradient_clipping": 1.0}
    # Saved before the configs set parameter_alignment: nothing recorded, unpadded.
    old = resumable_layout(shipped, {"step": 20, "samples_seen": 2560})
    assert old["zero_optimization"] == {"stage": 2, "parameter_alignment": False} and old["gradient_clipping"] == 1.0
    assert shipped["zero_optimization"]["parameter_alignment"] is True  # the run's config is not mutated
    assert resumable_layout(shipped, {"step": 20, "parameter_alignment": True}) is shipped
    assert resumable_layout(shipped, None) is shipped
