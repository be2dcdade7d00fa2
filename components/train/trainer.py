"""Driver side of training: launch the Ray Train + DeepSpeed run, then turn its last checkpoint into an export.

The export is made on the driver from the checkpoint in Ray Train's storage (shared on a cluster), so every
rank's ZeRO shards are visible: DeepSpeed's zero_to_fp32 consolidates them into one fp32 state dict.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from upath import UPath

from components import storage
from components.train.loop import CHECKPOINT_TAG, MODEL_SPEC, TRAINER_STATE, train_worker, weights_only_loads


@dataclass(frozen=True)
class ScaleSettings:
    workers: int = 2
    use_gpu: bool | str = "auto"
    cpus_per_worker: float = 1
    keep_checkpoints: int = 2
    max_failures: int = 1
    storage_path: str = "data/ray_results"
    run_name: str = "pretrain"
    resume_from: str | None = None


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def resolve_use_gpu(use_gpu: bool | str) -> bool:
    return cluster_has_gpus() if use_gpu == "auto" else bool(use_gpu)


def resolve_precision(deepspeed_config: dict[str, Any], use_gpu: bool) -> dict[str, Any]:
    """`bf16.enabled: auto` -> bf16 on GPUs, fp32 on CPUs (whose bf16 matmuls are slower than fp32 without AMX)."""
    bf16 = dict(deepspeed_config.get("bf16") or {})
    if bf16.get("enabled") == "auto":
        bf16["enabled"] = use_gpu
    return {**deepspeed_config, "bf16": bf16}


def fit(train_config: dict[str, Any], dataset: ray.data.Dataset, scale: ScaleSettings) -> ray.train.Result:
    """Run `train_worker` on `scale.workers` Ray Train workers; raises if training failed for good."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = resolve_use_gpu(scale.use_gpu)
    resources = {"CPU": scale.cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        # Ray Train 2 has no resume_from_checkpoint: the loop restores `resume_from` when Ray has no newer one.
        train_loop_config={**train_config, "resume_from": scale.resume_from},
        scaling_config=ScalingConfig(num_workers=scale.workers, use_gpu=use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        datasets={"train": dataset},
        run_config=RunConfig(
            name=scale.run_name,
            storage_path=scale.storage_path,
            checkpoint_config=CheckpointConfig(num_to_keep=scale.keep_checkpoints),
            failure_config=FailureConfig(max_failures=scale.max_failures),
        ),
    )
    return trainer.fit()


def consolidated_state_dict(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights from a DeepSpeed checkpoint of any ZeRO stage, unpickled weights-only (loop.weights_only_loads)."""
    state_dir = checkpoint_dir / CHECKPOINT_TAG
    try:
        with weights_only_loads():
            if list(state_dir.glob("*optim_states.pt")):
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=CHECKPOINT_TAG)
            else:  # ZeRO-0 without a separate master copy: the module's own weights
                state = torch.load(state_dir / "mp_rank_00_model_states.pt", map_location="cpu",
                                   weights_only=True)["module"]
    except pickle.UnpicklingError as error:
        refused = next((line for line in str(error).splitlines() if "GLOBAL" in line), "")
        raise ValueError(f"{checkpoint_dir}: refused, it holds objects other than weights ({refused.strip()})") from None
    return {name: tensor.float() for name, tensor in state.items()}


def checkpoint_uri(checkpoint: ray.train.Checkpoint) -> str:
    """Where a Ray Train checkpoint lies, as trainer.resume_from takes it: a local path or an object-store URL."""
    kind = checkpoint.filesystem.type_name
    if kind == "local":
        return checkpoint.path
    scheme = {"gcs": "gs"}.get(kind, kind)  # pyarrow's name for Google Cloud Storage
    return f"{scheme}://{checkpoint.path}"


def export_checkpoint(checkpoint_dir: Path, export_dir: UPath, tokenizer_dir: str | None = None, build=None):
    """Rebuild the model from the checkpoint's spec, load consolidated weights, save_pretrained (+ tokenizer)
    into `export_dir`, a local directory or an object-store location.
    build: spec -> module (default: the contrastive families' build_model)."""
    from components.train.tasks import build_spec_model

    spec = json.loads((checkpoint_dir / MODEL_SPEC).read_text())
    model = (build or build_spec_model)(spec)
    state = consolidated_state_dict(checkpoint_dir)
    shapes = {name: param.shape for name, param in model.state_dict().items()}
    # Training holds scalars as [1] vectors (loop.scalars_as_vectors): back to the model's own shapes.
    state = {name: t.reshape(shapes[name]) if name in shapes and t.numel() == shapes[name].numel() else t
             for name, t in state.items()}
    # Frozen parameters (AltCLIP's locked image tower) keep the values the spec built them with: the checkpoint
    # holds them only in the training precision (bf16 on GPUs), and training never changed them.
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    state = {name: t for name, t in state.items() if name not in frozen}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if name not in frozen]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    storage.replace_output(export_dir, "export_dir", inputs=(checkpoint_dir,))
    with storage.staged_directory(export_dir) as local:
        model.save_pretrained(local)
        if tokenizer_dir:
            from components.models.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(tokenizer_dir)
            if getattr(model, "max_text_length", None):  # truncation at the text tower's length for its users
                tokenizer.model_max_length = model.max_text_length
            tokenizer.save_pretrained(local)
    return model.eval()


def trainer_state(checkpoint_dir: Path) -> dict[str, int]:
    return json.loads((checkpoint_dir / TRAINER_STATE).read_text())
