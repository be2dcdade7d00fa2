"""The shipped DeepSpeed configs as the training loop builds an engine from them: every ZeRO stage trains (two
ranks over gloo, the loop's own engine set-up and task step), activation checkpointing gives the same losses as
without it, bf16 layouts (as on GPUs), and the layout a resumed checkpoint needs.

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
from components.train.loop import deepspeed_config, param_groups, scalars_as_vectors, skip_shared_memory_allreduce

skip_shared_memory_allreduce()  # as the loop does: on a fresh machine the op's JIT build costs ~40 s
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


# Each rank fits its own fixed batch of 8 random image-caption pairs (16 across the two ranks) for a few steps with
# the loop's engine set-up (initialise_engine) and the contrastive task's step, as a Ray Train worker would.
ENGINE_STEPS = r"""
import json, os, sys
import torch, torch.distributed as dist, yaml
dist.init_process_group("gloo")
rank = dist.get_rank()
from components.train.loop import LoopSettings, initialise_engine
from components.train.settings import trainer_defaults
from components.train.tasks import build_task

report = {}
for case in json.loads(sys.argv[1]):
    config = yaml.safe_load(open(f"conf/deepspeed/{case['deepspeed']}.yaml"))
    config["bf16"] = {**config["bf16"], "enabled": case.get("bf16", False)}
    torch.manual_seed(0)
    loss = {"kind": case.get("loss", "infonce"), "duplicate_positives": case.get("duplicate_positives", False)}
    model = {"family": "clip", "preset": "tiny", "vocab_size": 300, "image_size": 32, "pad_token_id": 0,
             "bos_token_id": 1, "eos_token_id": 3,
             **({"logit_bias": -10.0} if loss["kind"] == "siglip" else {})}
    task = build_task({"task": "contrastive", "model": model, "loss": loss,
                       "activation_checkpointing": case.get("activation_checkpointing", False)})
    accum = case.get("grad_accum", 1)
    settings = LoopSettings.from_trainer(trainer_defaults(), samples=16 * case["steps"], global_batch=16, lr=2e-3,
                                         warmup_fraction=0.0, grad_accum=accum)
    engine, _ = initialise_engine(task.model, settings, config, micro_batch=8 // accum,
                                  compile_model=case.get("compile", False))
    generator = torch.Generator().manual_seed(rank)
    batch = {"pixels": torch.randint(0, 256, (8, 32, 32, 3), generator=generator, dtype=torch.uint8),
             "input_ids": torch.cat([torch.ones(8, 1, dtype=torch.int64), torch.randint(4, 300, (8, 10), generator=generator),
                                     torch.full((8, 1), 3)], dim=1),
             "attention_mask": torch.ones(8, 12, dtype=torch.int64)}
    if case.get("twins"):  # rows 0 and 1 of each rank carry one caption
        batch["input_ids"][1] = batch["input_ids"][0]
    losses = []
    rows = 8 // accum
    chunks = [{k: v[i * rows:(i + 1) * rows] for k, v in batch.items()} for i in range(accum)]
    for _ in range(case["steps"]):
        if case.get("grad_cache"):  # the loop's GradCache step: one contrastive batch over the micro-batches
            losses.append(task.cached_step(engine, chunks)[0].item())
            continue
        chunk_losses = []
        for chunk in chunks:  # the loop's plain step, once per micro-batch
            value, _ = task.step(engine, chunk)
            engine.backward(value)
            engine.step()
            chunk_losses.append(value.item())
        losses.append(sum(chunk_losses) / accum)
    report[case["name"]] = {
        "losses": losses, "stage": engine.zero_optimization_stage(), "bf16": engine.bfloat16_enabled(),
        # ZeRO-3's optimizer keeps its fp32 states and the parameter partitions in host memory (offloaded)
        "offloaded": [getattr(engine.optimizer, name, False) for name in ("offload_optimizer", "offload_param")],
        "checkpointing": any(getattr(m, "gradient_checkpointing", False) for m in task.model.modules()),
        "compiled": engine.is_compiled}
print("STEPS " + json.dumps(report), flush=True)
# The work is done and reported. Interpreter teardown with the gloo group alive aborted one rank in about four runs
# here ("terminate called without an active exception", a C++ thread destroyed while joinable): end at once.
os._exit(0)
"""


def engine_steps(cases: list[dict]) -> list[dict]:
    """Each rank's report of ENGINE_STEPS over `cases`, two ranks over gloo."""
    port = str(free_port())
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2",
           "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", ENGINE_STEPS, json.dumps(cases)], cwd=REPO,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    reports = []
    for process in ranks:
        stdout, stderr = process.communicate(timeout=600)
        assert process.returncode == 0, stderr[-3000:]
        line = next(line for line in stdout.splitlines() if line.startswith("STEPS "))
        reports.append(json.loads(line.removeprefix("STEPS ")))
    return reports


@pytest.fixture(scope="module")
def trained_engines() -> list[dict]:
    return engine_steps([
        {"name": "zero1", "deepspeed": "zero1", "steps": 8},
        {"name": "zero3_offload", "deepspeed": "zero3_offload", "steps": 8},
        {"name": "zero3_bf16_siglip", "deepspeed": "zero3", "bf16": True, "loss": "siglip", "steps": 8},
        {"name": "zero2", "deepspeed": "zero2", "steps": 3},
        {"name": "zero2_checkpointed", "deepspeed": "zero2", "steps": 3, "activation_checkpointing": True},
        {"name": "zero2_accumulated", "deepspeed": "zero2", "steps": 3, "grad_accum": 4},
        {"name": "zero2_grad_cache", "deepspeed": "zero2", "steps": 3, "grad_accum": 4, "grad_cache": True},
        {"name": "twins_siglip_grad_cache", "deepspeed": "zero2", "steps": 2, "twins": True, "loss": "siglip",
         "grad_accum": 4, "grad_cache": True},
        *[{"name": f"twins_{kind}{'_positive' * positive}", "deepspeed": "zero2", "steps": 2, "twins": True,
           "loss": kind, "duplicate_positives": positive} for kind in ("infonce", "siglip") for positive in (False, True)],
    ])


@pytest.mark.parametrize("name, stage", [("zero1", 1), ("zero3_offload", 3), ("zero3_bf16_siglip", 3)])
def test_every_zero_stage_fits_its_batch(trained_engines, name, stage):
    # Measured (two ranks, 8 steps, deterministic on CPU): InfoNCE 2.89 -> 0.90 (ZeRO-1 and ZeRO-3 offloaded alike),
    # SigLIP in bf16 9.59 -> 3.79.
    for report in trained_engines:
        run = report[name]
        assert run["stage"] == stage and run["bf16"] == name.endswith("bf16_siglip")
        assert run["losses"][-1] < 0.5 * run["losses"][0], run["losses"]
    assert trained_engines[0]["zero3_offload"]["offloaded"] == [True, True]
    assert trained_engines[0]["zero3_bf16_siglip"]["offloaded"] == [False, False]


def test_activation_checkpointing_gives_the_same_losses_as_without(trained_engines):
    for report in trained_engines:
        plain, checkpointed = report["zero2"], report["zero2_checkpointed"]
        assert checkpointed["checkpointing"] and not plain["checkpointing"]
        assert checkpointed["losses"] == pytest.approx(plain["losses"], rel=1e-6, abs=1e-6)
        assert plain["losses"][-1] < plain["losses"][0]  # the steps between the compared losses changed weights


def test_grad_cache_trains_the_whole_batch_as_one_contrastive_batch_in_micro_batches(trained_engines):
    """trainer.grad_cache with grad_accum 4 (micro-batches of 2 on each rank): the losses, step after step, are those
    of the 16-sample batch trained whole (InfoNCE; SigLIP, whose bias takes its gradient through the same path),
    where plain accumulation trains four 4-sample contrastive problems (a lower loss, log 4 against log 16 at
    chance, and other weights after the first step)."""
    for report in trained_engines:
        whole, cached, split = (report[n]["losses"] for n in ("zero2", "zero2_grad_cache", "zero2_accumulated"))
        assert cached == pytest.approx(whole, rel=1e-4, abs=1e-4), (cached, whole)
        assert split[0] < whole[0] - 1.0, (split, whole)
        siglip, siglip_cached = report["twins_siglip"]["losses"], report["twins_siglip_grad_cache"]["losses"]
        assert siglip_cached == pytest.approx(siglip, rel=1e-4, abs=1e-4), (siglip_cached, siglip)


@pytest.mark.slow  # inductor compiles the tiny CLIP's graphs for ~50-90 s a rank on this machine
def test_a_compiled_engine_trains_with_the_losses_of_the_eager_one(trained_engines):
    """trainer.compile's path (initialise_engine's engine.compile, inductor on CPU): the same losses, step after
    step, as the eager engine from the same seed and batches."""
    compiled = engine_steps([{"name": "zero2_compiled", "deepspeed": "zero2", "steps": 3, "compile": True}])
    for eager, report in zip(trained_engines, compiled):
        assert report["zero2_compiled"]["compiled"] and not eager["zero2"]["compiled"]
        assert report["zero2_compiled"]["losses"] == pytest.approx(eager["zero2"]["losses"], rel=1e-4, abs=1e-4)


def test_duplicate_positives_reach_the_loss_through_the_training_step(trained_engines):
    """loss.duplicate_positives through the contrastive task's step, as a worker runs it, on batches holding one
    caption twice. Equal captions embed equally, so under InfoNCE the twin's logit equals the row's own and spreading
    the target over both changes neither the loss nor its gradient (losses equal step after step); SigLIP scores each
    pair alone, and the twin turns from a -1 pair into a +1 pair."""
    for report in trained_engines:
        clip, spread = report["twins_infonce"]["losses"], report["twins_infonce_positive"]["losses"]
        assert spread == pytest.approx(clip, rel=1e-5, abs=1e-5)
        siglip, positive = report["twins_siglip"]["losses"][0], report["twins_siglip_positive"]["losses"][0]
        assert abs(siglip - positive) > 1e-3, (siglip, positive)


def test_a_resumed_checkpoint_keeps_the_layout_it_was_saved_with():
    from components.train.loop import resumable_layout

    shipped = {"zero_optimization": {"stage": 2, "parameter_alignment": True}, "gradient_clipping": 1.0}
    # Saved before the configs set parameter_alignment: nothing recorded, unpadded.
    old = resumable_layout(shipped, {"step": 20, "samples_seen": 2560})
    assert old["zero_optimization"] == {"stage": 2, "parameter_alignment": False} and old["gradient_clipping"] == 1.0
    assert shipped["zero_optimization"]["parameter_alignment"] is True  # the run's config is not mutated
    assert resumable_layout(shipped, {"step": 20, "parameter_alignment": True}) is shipped
    assert resumable_layout(shipped, None) is shipped


class _RunsCode:
    """Unpickled, it makes the directory `marker`: what a planted checkpoint could do instead."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("stage", ["zero0", "zero2"])  # our own torch.load, and DeepSpeed's zero_to_fp32
def test_a_checkpoint_that_would_run_code_as_it_loads_is_refused(tmp_path, stage):
    import torch

    from components.train.loop import CHECKPOINT_TAG
    from components.train.trainer import consolidated_state_dict

    state, marker = tmp_path / "checkpoint" / CHECKPOINT_TAG, tmp_path / "code-ran"
    state.mkdir(parents=True)
    torch.save({"module": {"weight": torch.zeros(2)}, "payload": _RunsCode(marker)}, state / "mp_rank_00_model_states.pt")
    if stage == "zero2":
        torch.save({"optimizer_state_dict": {}}, state / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ValueError, match="refused, it holds objects other than weights .*GLOBAL posix.mkdir"):
        consolidated_state_dict(tmp_path / "checkpoint")
    assert not marker.exists() and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
