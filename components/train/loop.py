"""The one training loop: what every Ray Train worker runs, for every objective (a task object supplies the loss).

Reads top to bottom: build the task (model + objective) -> AdamW + warmup/cosine -> deepspeed.initialize ->
restore the latest Ray checkpoint if any -> stream batches from this worker's dataset shard -> step ->
log (rank 0, MLflow) -> checkpoint through ray.train.report every N steps -> final checkpoint.

Resume and data position: a restored run continues its step, samples-seen count, optimizer, scheduler and
RNG-free state from the checkpoint, but the data stream starts a fresh pass in a new shuffled order; nothing
is replayed. On datasets much larger than a run, that is sampling without a memory of the interrupted pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from components import storage

# DeepSpeed picks its accelerator at import; say which before any worker imports it.
os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")

CHECKPOINT_TAG = "state"
TRAINER_STATE = "trainer_state.json"
PARAMETER_ALIGNMENT = "parameter_alignment"  # zero_optimization key, recorded in TRAINER_STATE
MODEL_SPEC = "model_spec.json"
CHECKPOINT_TOKENIZER = "tokenizer"


@dataclass(frozen=True)
class LoopSettings:
    """The training loop's settings: the trainer group's (conf/trainer/default.yaml holds their values and
    meaning) plus AdamW's betas and eps, which only this loop sets."""

    samples: int
    global_batch: int
    grad_accum: int
    lr: float
    weight_decay: float
    warmup_fraction: float
    log_every: int
    checkpoint_every: int
    local_shuffle_buffer: int
    seed: int
    grad_cache: bool = False
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6

    @classmethod
    def from_trainer(cls, trainer_cfg: Mapping[str, Any], **overrides: Any) -> LoopSettings:
        """From a trainer config (the group, or a stage's merged one), `overrides` on top."""
        names = [f.name for f in fields(cls) if f.name in trainer_cfg]
        return cls(**{**{name: trainer_cfg[name] for name in names}, **overrides})

    @property
    def total_steps(self) -> int:
        return max(1, self.samples // self.global_batch)

    def micro_batch(self, world_size: int) -> int:
        per_worker, remainder = divmod(self.global_batch, world_size * self.grad_accum)
        if remainder or per_worker == 0:
            raise ValueError(f"global_batch {self.global_batch} is not a multiple of workers {world_size} x "
                             f"grad_accum {self.grad_accum}")
        return per_worker


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms, embeddings' position tables of rank 1 and scalars like logit_scale."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "logit_" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def scalars_as_vectors(model: torch.nn.Module) -> None:
    """Give 0-dim parameters (logit_scale) shape [1]: DeepSpeed broadcasts every parameter as bytes
    (`p.data.view(torch.uint8)`), which a 0-dim bf16 tensor cannot do. The export restores their shape."""
    for param in model.parameters():
        if param.dim() == 0:
            param.data = param.data.reshape(1)


def deepspeed_config(base: dict[str, Any], micro_batch: int, grad_accum: int) -> dict[str, Any]:
    config = json.loads(json.dumps(base))
    config.update(train_micro_batch_size_per_gpu=micro_batch, gradient_accumulation_steps=grad_accum)
    # Our optimizer is torch's AdamW (DeepSpeed's fused/CPU Adam need compiled ops; on GPU pass "optimizer" in the
    # deepspeed config to use DeepSpeed's own).
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("zero_force_ds_cpu_optimizer", False)
    config.setdefault("steps_per_print", 10**9)
    return config


def resumable_layout(base: dict[str, Any], state: dict[str, Any] | None) -> dict[str, Any]:
    """`base` with the ZeRO-1/2 flat-buffer layout the resumed checkpoint was saved with: DeepSpeed refuses to load
    a padded layout into an unpadded one or back. Checkpoints from before the configs set parameter_alignment
    record nothing and are unpadded."""
    if state is None:
        return base
    zero = dict(base.get("zero_optimization") or {})
    saved = bool(state.get(PARAMETER_ALIGNMENT, False))
    if bool(zero.get(PARAMETER_ALIGNMENT, False)) == saved:
        return base
    return {**base, "zero_optimization": {**zero, PARAMETER_ALIGNMENT: saved}}


FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch.load reads it on every call, over the caller's choice


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside, every torch.load unpickles only tensors, plain containers and the three DeepSpeed classes its
    checkpoints hold (ZeRO-0 to 3), DeepSpeed's own loads included: they ask for weights_only=False, which
    TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides. A checkpoint named by a setting (trainer.resume_from) or found in
    shared storage can then not run code as it is loaded; a file that needs any other class is refused."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    saved = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
            yield
    finally:
        if saved is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = saved


def skip_shared_memory_allreduce() -> None:
    """Keep DeepSpeed from JIT-compiling its CPU shared-memory all-reduce (deepspeed_shm_comm) when its
    communication backend starts. Only DeepSpeed's inference all-reduce calls that op; training's collectives go
    through torch.distributed (gloo, NCCL) either way. Compiling it costs 25-45 s of a two-core machine's first run,
    and again whenever a process whose build flags differ (a Ray job's environment) rewrites the shared cache."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # the probe's dict, read by the backend


def initialise_engine(model: torch.nn.Module, settings: LoopSettings, deepspeed_base: dict[str, Any],
                      micro_batch: int, compile_model: bool = False):
    """(DeepSpeed engine, its lr scheduler) for `model`: AdamW without decay on norms, biases and scalars, linear
    warmup then cosine, the ZeRO stage and precision of `deepspeed_base` (a conf/deepspeed config).
    `compile_model`: torch.compile the module inside the engine (DeepSpeed's engine.compile, inductor), so that
    ZeRO's hooks stay outside the compiled graphs; the first step pays the compilation."""
    import deepspeed
    from transformers import get_cosine_schedule_with_warmup

    skip_shared_memory_allreduce()
    scalars_as_vectors(model)
    optimizer = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr, betas=settings.betas,
                                  eps=settings.eps)
    # transformers' schedule: the lr rises linearly from 0 at step 0 (open_clip's from 1/warmup), then a half cosine
    # to 0 at the last step.
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(settings.warmup_fraction * settings.total_steps),
                                                settings.total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(deepspeed_base, micro_batch, settings.grad_accum))
    if compile_model:
        engine.compile()
    return engine, scheduler


def train_worker(config: dict[str, Any]) -> None:
    """TorchTrainer's train_loop_per_worker. `config` is plain data (see components/train/trainer.py)."""
    import ray.train
    from ray.train import Checkpoint

    from components.train.tasks import build_task

    # DeepSpeed's ZeRO calls the collectives torch 2.13 renamed, and torch warns on every call (every step).
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` "
                                              r"is deprecated", category=FutureWarning)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    settings = LoopSettings(**config["loop"])
    torch.manual_seed(settings.seed)  # identical initial weights on every rank
    if config.get("torch_threads"):
        torch.set_num_threads(config["torch_threads"])

    memory = _WorkerMemory()
    task = build_task(config)
    micro_batch = settings.micro_batch(world)
    step, samples_seen = 0, 0
    checkpoint = ray.train.get_checkpoint() or (Checkpoint(config["resume_from"]) if config.get("resume_from") else None)
    with contextlib.ExitStack() as stack:
        directory = Path(stack.enter_context(checkpoint.as_directory())) if checkpoint else None
        state = json.loads((directory / TRAINER_STATE).read_text()) if directory else None
        deepspeed_base = resumable_layout(config["deepspeed"], state)
        engine, scheduler = initialise_engine(task.model, settings, deepspeed_base, micro_batch,
                                              compile_model=bool(config.get("compile")))
        if state:
            with weights_only_loads():
                engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
            step, samples_seen = state["step"], state["samples_seen"]
            _say(rank, f"resumed from step {step} ({samples_seen} samples seen)")
    alignment = bool((deepspeed_base.get("zero_optimization") or {}).get(PARAMETER_ALIGNMENT, False))

    logger = _MetricLogger(config.get("mlflow"), rank)
    periodic, periodic_text = _periodic_evaluation(config, task.model)
    shard = ray.train.get_dataset_shard("train")
    device = engine.device
    window = _Window()
    micro_step = 0

    def save(metrics: dict[str, float]) -> None:
        with tempfile.TemporaryDirectory() as directory:
            engine.save_checkpoint(directory, tag=CHECKPOINT_TAG)
            if rank == 0:
                (Path(directory) / TRAINER_STATE).write_text(json.dumps(
                    {"step": step, "samples_seen": samples_seen, PARAMETER_ALIGNMENT: alignment}))
                (Path(directory) / MODEL_SPEC).write_text(json.dumps(config["model"]))
                if config.get("tokenizer_dir"):  # a checkpoint resumes with the tokenizer it was trained with
                    with storage.local_copy(config["tokenizer_dir"]) as tokenizer_dir:
                        shutil.copytree(tokenizer_dir, Path(directory) / CHECKPOINT_TOKENIZER)
            ray.train.report({**metrics, "step": step}, checkpoint=Checkpoint.from_directory(directory))

    # GradCache: the step's micro-batches form one contrastive batch (tasks.ContrastiveTask.cached_step).
    cached = settings.grad_cache and settings.grad_accum > 1 and hasattr(task, "cached_step")
    if cached:
        _say(rank, f"GradCache: {settings.grad_accum} micro-batches of {micro_batch} a worker form each contrastive "
                   f"batch of {settings.global_batch}")
    pending: list[dict[str, torch.Tensor]] = []
    window.start()
    for batch in _batches(shard, micro_batch, settings, device):
        window.data_ready()
        if cached:
            pending.append(batch)
            if len(pending) < settings.grad_accum:
                window.start()
                continue
            loss, metrics = task.cached_step(engine, pending)
            pending = []
            micro_step += settings.grad_accum
        else:
            loss, metrics = task.step(engine, batch)
            engine.backward(loss)
            engine.step()
            micro_step += 1
        window.step_done(loss.item())
        if micro_step % settings.grad_accum:
            window.start()
            continue
        step += 1
        samples_seen += settings.global_batch
        if step % settings.log_every == 0 or step == settings.total_steps:
            summary = window.summary(settings.global_batch)
            lr = scheduler.get_last_lr()[0] if scheduler is not None else settings.lr
            logger.log({**summary, **metrics, **memory.metrics(), "lr": lr, "samples_seen": samples_seen}, step)
            _say(rank, f"step {step}/{settings.total_steps}  loss {summary['loss']:.4f}  "
                       f"{summary['samples_per_second']:.0f} samples/s  data wait {summary['data_wait_fraction']:.0%}")
        if periodic is not None and periodic.due(step):
            results = periodic(task.model, periodic_text)  # every rank: ZeRO-3 gathers need all
            logger.log(results, step)
            _say(rank, "evaluation at step {}: {}".format(
                step, "  ".join(f"{k.removeprefix('eval.')} {v:.3f}" for k, v in results.items() if "_R5" in k
                                or k.endswith(".acc1") or k.endswith(".acc5"))))
        done = step >= settings.total_steps
        if done or step % settings.checkpoint_every == 0:
            save({"loss": window.last_loss})
        if done:
            break
        window.start()


def _periodic_evaluation(config: dict[str, Any], model):
    """(evaluator, the model's text processor) for evaluation during training, or (None, None) when it is off."""
    spec = config.get("periodic_eval")
    if not spec or not spec.get("every"):
        return None, None
    from components.eval.periodic import PeriodicEvaluation

    text = model.text_processor(config.get("tokenizer_dir")).loaded()
    return PeriodicEvaluation(spec["rows"], spec["task"], spec["settings"], spec["every"]), text


def _batches(shard, micro_batch: int, settings: LoopSettings, device) -> Iterator[dict[str, torch.Tensor]]:
    """Endless: one pass over this worker's shard after another (each pass in a new shuffled order)."""
    while True:
        produced = 0
        for batch in shard.iter_torch_batches(batch_size=micro_batch, drop_last=True, device=device,
                                              local_shuffle_buffer_size=settings.local_shuffle_buffer or None,
                                              local_shuffle_seed=None):
            produced += 1
            yield batch
        if produced == 0:
            raise RuntimeError(f"this worker's data shard holds fewer than one micro-batch ({micro_batch} samples)")


class _Window:
    """Step timing split into waiting for data vs computing, and the mean loss since the last log line."""

    def __init__(self):
        self.losses, self.wait, self.busy, self.last_loss = [], 0.0, 0.0, float("nan")
        self._t = time.perf_counter()
        self._ready = self._t

    def start(self) -> None:
        self._t = time.perf_counter()

    def data_ready(self) -> None:
        self._ready = time.perf_counter()
        self.wait += self._ready - self._t

    def step_done(self, loss: float) -> None:
        self.busy += time.perf_counter() - self._ready
        self.losses.append(loss)
        self.last_loss = loss

    def summary(self, global_batch: int) -> dict[str, float]:
        steps, elapsed = len(self.losses), self.wait + self.busy
        out = {"loss": sum(self.losses) / max(1, steps),
               "samples_per_second": steps * global_batch / elapsed if elapsed else 0.0,
               "data_wait_fraction": self.wait / elapsed if elapsed else 0.0}
        self.losses, self.wait, self.busy = [], 0.0, 0.0
        return out


class _WorkerMemory:
    """This worker's memory, logged with every status line: its RSS when the loop starts (imports, Ray, the data
    client) and its peak since process start, whose difference is what the model, optimizer state, ZeRO buffers
    and activations take on a CPU; on GPUs also the device's peak allocation."""

    def __init__(self):
        import psutil

        self.start_rss = psutil.Process().memory_info().rss

    def metrics(self) -> dict[str, float]:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        memory = {"memory.start_rss_mib": self.start_rss / 2**20, "memory.peak_rss_mib": peak / 2**20}
        if torch.cuda.is_available():
            memory["memory.device_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
        return memory


class _MetricLogger:
    """Rank 0 writes metrics straight to the MLflow run the driver opened (client API: no global state)."""

    def __init__(self, mlflow_config: dict | None, rank: int):
        self.client = None
        if mlflow_config and rank == 0:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=mlflow_config["tracking_uri"])
            self.run_id = mlflow_config["run_id"]

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def _say(rank: int, message: str) -> None:
    if rank == 0:
        # Ray Train patches print in its workers to tee every line to the worker's stdout and to its logger, which
        # the driver shows again from stderr; the process's own stdout takes the line once.
        print(f"[train] {message}", file=sys.__stdout__, flush=True)

