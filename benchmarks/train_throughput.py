"""Training throughput and memory: a plain PyTorch loop vs our Ray Train + DeepSpeed pipeline, side by side.

    python benchmarks/train_throughput.py                     # tiny CLIP, batch 128; ZeRO-0 vs ZeRO-3 on `base`
    python benchmarks/train_throughput.py --samples 12800 --skip-memory
    python benchmarks/train_throughput.py --skip-throughput

(a) plain: one process, the same model, batch and optimizer, images and token ids already in memory (decoded
    once from the same shards), fp32, torch threads = all cores: the ceiling for this machine. It runs before
    and after (b) and (c); the ratios are against the mean of the two.
(b) ours, 1 Ray Train worker and (c) 2 workers: `pipelines/pretrain_clip.py` as users run it (Ray Data
    decoding/augmenting/tokenising on the same machine, DeepSpeed ZeRO-2, fp32 on CPU). Rates are the
    samples/s and data-wait fraction the loop logs to MLflow, over the log windows after the first (harmonic
    mean of the rates, time-weighted mean of the waits).
(a1) plain with 1 torch thread and (b1) ours, 1 worker with 1 thread (on machines of 2 or more cores): the
    other cores are left to Ray's own processes and the preprocessing, as on a node with cores to spare, so
    (b1)/(a1) is what the pipeline costs a training thread that nothing preempts; (a1) runs before and after (b1).
Beside (a), in the same process: the loop's own step (ContrastiveTask in a DeepSpeed ZeRO-2 engine, no Ray)
    on the same tensors, and the preprocessing's CPU time per sample: what (b)'s gap is not.
Memory: ZeRO-0 vs ZeRO-3 with the `base` preset (>= 100M parameters) at 2 workers, a few steps each: the peak
    RSS of each Ray Train worker process (sampled with psutil), and what training itself took in rank 0's worker:
    its peak RSS minus its RSS when the loop started (imports, Ray, the data client), as the loop logs them
    (memory.peak_rss_mib, memory.start_rss_mib). On a GPU the latter is what device memory would show.
All contenders run in this one invocation, one after the other, on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.report import write_results  # noqa: E402
from benchmarks.sampling import PeriodicSampler  # noqa: E402
from tests.helpers import free_port  # noqa: E402

# ----------------------------------------------------------------------------- knobs
SAMPLES = 7680  # per throughput contender
BATCH = 128
CONCEPTS = 900  # built-in corpus concepts ingested for the runs
MEMORY_PRESET = "base"
MEMORY_SAMPLES = 8  # 2 steps of global batch 4
OUT = "benchmarks/results/train.json"
SAMPLE_S = 0.2
ENGINE_BLOCK = 6  # steps per timed block of (a) and of the engine-only step, taken in turn
# -----------------------------------------------------------------------------


def ingest(work: Path, env: dict) -> Path:
    out = work / "shards"
    subprocess.run([sys.executable, str(REPO / "pipelines" / "ingest.py"), "data=emoji_local",
                    f"data.corpus_dir={REPO / 'data' / 'emoji_corpus'}", f"data.limit={CONCEPTS}",
                    f"data.output_dir={out}", "progress=false", f"hydra.run.dir={work / 'hydra_ingest'}"],
                   check=True, cwd=work, env=env, capture_output=True)
    return out


def in_process(shards: Path, samples: int, batch: int, threads: int, engine: bool = True) -> dict:
    """(a): the same model, loss, optimizer and batch in one process over in-memory tensors, `threads` torch
    threads; beside it (engine=True), in blocks taken in turn, the training loop's own step (ContrastiveTask in a
    DeepSpeed engine, ZeRO-2, world of 1) on the same tensors: what DeepSpeed costs without Ray. Also the data
    pipeline's preprocessing per sample."""
    import torch
    from PIL import Image

    from components.models.base import normalize_pixels
    from components.models.factory import build_model
    from components.models.tokenizer import train_bpe
    from components.train.losses import ContrastiveLoss
    from tests.helpers import read_shards

    rows = [r for r in read_shards(shards) if r["json"]["split"] == "train"]
    tokenizer = train_bpe([r["txt"] for r in rows], vocab_size=4096)

    def model():
        torch.manual_seed(0)
        return build_model("clip", "tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)

    plain = model()
    preprocess_ms = preprocess_cost(rows, tokenizer, plain.image_size)
    torch.set_num_threads(threads)
    pixels = torch.from_numpy(np.stack([np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB")
                                                    .resize((plain.image_size, plain.image_size))) for r in rows]))
    encoded = tokenizer([r["txt"] for r in rows], padding="max_length", truncation=True,
                        max_length=plain.max_text_length, return_tensors="pt")
    generator = torch.Generator().manual_seed(0)

    def next_batch() -> dict:
        index = torch.randint(len(rows), (batch,), generator=generator)
        return {"pixels": pixels[index], "input_ids": encoded["input_ids"][index],
                "attention_mask": encoded["attention_mask"][index]}

    optimizer = torch.optim.AdamW(plain.parameters(), lr=1e-3, weight_decay=0.1)
    loss_fn = ContrastiveLoss()

    def plain_step() -> None:
        b = next_batch()
        image, text, scale, _ = plain(normalize_pixels(b["pixels"], plain.image_mean, plain.image_std, torch.float32),
                                      {"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]})
        loss_fn(image, text, plain.loss_similarity, scale).backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    steps = {"plain": plain_step}
    if engine:
        steps["engine"] = engine_stepper(model(), batch, next_batch)
    blocks = max(1, samples // batch // ENGINE_BLOCK)
    seconds = dict.fromkeys(steps, 0.0)
    for step in steps.values():
        for _ in range(3):  # warm-up
            step()
    for _ in range(blocks):  # in turn, so that drift on a shared machine hits both alike
        for name, step in steps.items():
            started = time.perf_counter()
            for _ in range(ENGINE_BLOCK):
                step()
            seconds[name] += time.perf_counter() - started
    rate = {name: round(batch * ENGINE_BLOCK * blocks / t, 1) for name, t in seconds.items()}
    result = {"samples_per_s": rate["plain"], "threads": threads, "steps": ENGINE_BLOCK * blocks,
              "preprocess_ms_per_sample_one_core": preprocess_ms, "parameters": plain.num_parameters()}
    if engine:
        result.update(engine_samples_per_s=rate["engine"], engine_vs_plain=round(rate["engine"] / rate["plain"], 3))
    return result


def engine_stepper(ours, batch: int, next_batch):
    """One training step of the loop's own (ContrastiveTask in a DeepSpeed engine, ZeRO-2), built as
    components/train/loop.py builds it, in this process as a world of one."""
    from omegaconf import OmegaConf

    from components.train.loop import LoopSettings, initialise_engine
    from components.train.losses import ContrastiveLoss
    from components.train.trainer import resolve_precision
    from components.train.settings import trainer_defaults
    from components.train.tasks import ContrastiveTask

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                      WORLD_SIZE="1")
    task = ContrastiveTask(ours, ContrastiveLoss())
    zero2 = resolve_precision(OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "deepspeed" / "zero2.yaml")),
                              use_gpu=False)
    # No warmup and a cosine over 10**6 steps: the learning rate stays at its peak, as in the plain loop.
    settings = LoopSettings.from_trainer(trainer_defaults(), samples=10**6 * batch, global_batch=batch,
                                         warmup_fraction=0.0)
    engine, _ = initialise_engine(ours, settings, zero2, micro_batch=batch)

    def engine_step() -> None:
        loss, _ = task.step(engine, next_batch())
        engine.backward(loss)
        engine.step()
        loss.item()

    return engine_step


def preprocess_cost(rows: list[dict], tokenizer, image_size: int) -> float:
    """Milliseconds of one core per sample of the training data's preprocessing (decode, random resized crop,
    tokenise), as Ray Data's tasks run it."""
    import json

    import torch

    from components.models.text import Tokens
    from components.train.data import BatchSpec, Preprocess, TextConfig

    preprocess = Preprocess(BatchSpec(image_size=image_size, text=TextConfig(Tokens.wrapping(tokenizer, 32))))
    batch = {"image": np.array([r["image"] for r in rows[:64]], dtype=object),
             "meta": np.array([json.dumps(r["json"]) for r in rows[:64]], dtype=object)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    preprocess(batch)
    started, repeats = time.perf_counter(), 20
    for _ in range(repeats):
        preprocess(batch)
    torch.set_num_threads(threads)
    return round(1000 * (time.perf_counter() - started) / (repeats * len(batch["image"])), 3)


class WorkerSampler(PeriodicSampler):
    """Peak RSS per Ray Train worker process (process title "ray::RayTrainWorker...")."""

    def __init__(self):
        super().__init__(SAMPLE_S)
        self.peak: dict[int, int] = {}

    def sample(self) -> bool:
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                    self.peak[proc.pid] = max(self.peak.get(proc.pid, 0), proc.memory_info().rss)
            except psutil.Error:
                continue
        return True


def pipeline_run(shards: Path, work: Path, name: str, env: dict, args: list[str]) -> dict:
    """Run pipelines/pretrain_clip.py; returns its logged rates and the workers' peak RSS."""
    from mlflow.tracking import MlflowClient

    run_dir = work / name
    run_dir.mkdir()
    uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    cmd = [sys.executable, str(REPO / "pipelines" / "pretrain_clip.py"), "data=emoji_local",
           f"data.output_dir={shards}", f"export_dir={run_dir / 'model'}", f"tokenizer.save_dir={run_dir / 'tok'}",
           f"trainer.storage_path={run_dir / 'ray'}", "progress=false", f"hydra.run.dir={run_dir / 'hydra'}",
           f"mlflow.run_name={name}", *args]
    started = time.perf_counter()
    with WorkerSampler() as sampler, open(run_dir / "log.txt", "w") as log:
        subprocess.run(cmd, check=True, cwd=run_dir, env={**env, "MLFLOW_TRACKING_URI": uri}, stdout=log,
                       stderr=subprocess.STDOUT)
    wall = time.perf_counter() - started
    client = MlflowClient(uri)
    run = client.search_runs([client.get_experiment_by_name("clipforge").experiment_id])[0]

    def history(metric: str) -> list[float]:
        return [m.value for m in sorted(client.get_metric_history(run.info.run_id, metric), key=lambda m: m.step)]

    # Every log window holds the same number of samples: the run's rate is the harmonic mean of the windows'
    # rates and its data-wait fraction the time-weighted mean. The first window (warm-up) is left out.
    rates, waits = history("samples_per_second")[1:], history("data_wait_fraction")[1:]
    seconds = [1 / r for r in rates]
    return {"samples_per_s": round(len(rates) / sum(seconds), 1) if rates else None,
            "best_window_samples_per_s": round(max(rates), 1) if rates else None,
            "data_wait_fraction": round(sum(w * t for w, t in zip(waits, seconds)) / sum(seconds), 3) if rates else None,
            "train_seconds": round(run.data.metrics.get("train_seconds", 0), 1), "wall_s": round(wall, 1),
            "parameters": int(run.data.metrics["model.parameters"]),
            "rank0_training_memory_mib": round(run.data.metrics["memory.peak_rss_mib"]
                                               - run.data.metrics["memory.start_rss_mib"]),
            "peak_worker_rss_mib": sorted(round(v / 2**20) for v in sampler.peak.values())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=SAMPLES)
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "")
    results: dict = {"machine": {"cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                                 "cpu": cpu, "python": platform.python_version(), "torch": version("torch"),
                                 "ray": version("ray"), "deepspeed": version("deepspeed")},
                     "settings": vars(args)}
    work = Path(tempfile.mkdtemp(prefix="clipforge-train-bench-"))
    try:
        print("ingesting the built-in corpus ...", flush=True)
        shards = ingest(work, env)
        common = [f"trainer.samples={args.samples}", f"trainer.global_batch={args.batch}", "trainer.log_every=5",
                  "eval_samples=64"]
        if not args.skip_throughput:
            cores = os.cpu_count() or 1
            print("[a] plain PyTorch loop ...", flush=True)
            results["plain"] = in_process(shards, args.samples, args.batch, cores)
            for workers in (1, 2):
                print(f"[{'bc'[workers - 1]}] ours, {workers} worker(s) ...", flush=True)
                results[f"ours_{workers}_workers"] = pipeline_run(
                    shards, work, f"ours_{workers}", env, [*common, f"trainer.workers={workers}",
                                                          f"trainer.torch_threads={cores // workers}"])
            # (a) again: on a shared machine the plain loop's rate drifts between runs of this script (153-222
            # samples/s seen); its mean before and after the pipeline runs is the baseline.
            print("[a] plain PyTorch loop, again ...", flush=True)
            results["plain_after"] = in_process(shards, args.samples, args.batch, cores)
            if cores > 1:
                # One training thread each, the other cores left to Ray's own processes and the preprocessing, as
                # on a node with cores to spare: what the pipeline costs a training thread that nothing preempts.
                print("[a1] plain PyTorch loop, 1 thread ...", flush=True)
                results["plain_1_thread"] = in_process(shards, args.samples, args.batch, 1, engine=False)
                print("[b1] ours, 1 worker, 1 thread ...", flush=True)
                results["ours_1_worker_1_thread"] = pipeline_run(
                    shards, work, "ours_1_thread", env, [*common, "trainer.workers=1", "trainer.torch_threads=1"])
                print("[a1] plain PyTorch loop, 1 thread, again ...", flush=True)
                results["plain_1_thread_after"] = in_process(shards, args.samples, args.batch, 1, engine=False)
        if not args.skip_memory:
            for stage in (0, 3):
                print(f"[memory] ZeRO-{stage}, {MEMORY_PRESET} preset, 2 workers ...", flush=True)
                results[f"memory_zero{stage}"] = pipeline_run(
                    shards, work, f"zero{stage}", env,
                    [f"deepspeed=zero{stage}", f"model.preset={MEMORY_PRESET}", f"trainer.samples={MEMORY_SAMPLES}",
                     "trainer.global_batch=4", "trainer.log_every=1", "eval_samples=8", "tokenizer.vocab_size=8192"])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if not args.skip_throughput:
        print(f"\n{'':30} {'samples/s':>9} {'vs plain':>8} {'data wait':>9} {'best window':>11}")
        comparisons = [("plain", "(a) plain PyTorch", [("ours_1_workers", "(b) ours, 1 worker"),
                                                       ("ours_2_workers", "(c) ours, 2 workers")]),
                       ("plain_1_thread", "(a1) plain, 1 thread", [("ours_1_worker_1_thread",
                                                                    "(b1) ours, 1 worker, 1 thread")])]
        for baseline, label, contenders in comparisons:
            if baseline not in results:
                continue
            before, after = results[baseline]["samples_per_s"], results[f"{baseline}_after"]["samples_per_s"]
            plain = results[f"{baseline}_mean_samples_per_s"] = round((before + after) / 2, 1)
            print(f"{label:30} {plain:9.1f} {1:8.2f}   (before {before:.1f}, after {after:.1f})")
            for key, name in contenders:
                r = results[key]
                r["ratio_vs_plain"] = round(r["samples_per_s"] / plain, 3)
                print(f"{name:30} {r['samples_per_s']:9.1f} {r['ratio_vs_plain']:8.2f} "
                      f"{r['data_wait_fraction']:9.0%} {r['best_window_samples_per_s']:11.1f}")
        runs = [results["plain"], results["plain_after"]]
        print(f"\nthe loop's step in a DeepSpeed engine, no Ray, same tensors: "
              f"{runs[0]['engine_vs_plain']:.2f}x and {runs[1]['engine_vs_plain']:.2f}x of (a) in the same process; "
              f"preprocessing {runs[0]['preprocess_ms_per_sample_one_core']:.3f} ms of one core per sample")
    if not args.skip_memory:
        zero0, zero3 = (max(results[f"memory_zero{s}"]["peak_worker_rss_mib"]) for s in (0, 3))
        state0, state3 = (results[f"memory_zero{s}"]["rank0_training_memory_mib"] for s in (0, 3))
        results["memory_ratio_zero3_vs_zero0"] = round(zero3 / zero0, 3)
        results["training_memory_ratio_zero3_vs_zero0"] = round(state3 / state0, 3)
        print(f"\n{MEMORY_PRESET} preset ({results['memory_zero0']['parameters'] / 1e6:.0f}M parameters), 2 workers, "
              f"peak RSS per worker: ZeRO-0 {zero0} MiB, ZeRO-3 {zero3} MiB ({zero3 / zero0:.2f}x); "
              f"training's own (peak - start, rank 0): ZeRO-0 {state0} MiB, ZeRO-3 {state3} MiB "
              f"({state3 / state0:.2f}x)")
    write_results(results, args.out)


if __name__ == "__main__":
    main()
