"""Peak memory and step time of one contrastive batch trained whole against the same batch as GradCache
micro-batches (trainer.grad_cache: components/train/tasks.py, ContrastiveTask.cached_step), through the real
DeepSpeed engine the training loop builds (ZeRO-2, one rank over gloo, CPU).

    python benchmarks/grad_cache_memory.py                       # tiny CLIP at 64 px, batch 512 = 8 x 64
    python benchmarks/grad_cache_memory.py --preset small --batch 1024 --accum 16

Each way runs in a fresh process, so that its peak resident memory (ru_maxrss) is its own; the growth over the
memory after the engine is built is what the step's activations took. Both ways compute the same loss (checked on
the first step). Results go to benchmarks/results/grad_cache_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OUT = "benchmarks/results/grad_cache_memory.json"


def run_one(preset: str, batch: int, accum: int, steps: int, cached: bool) -> dict:
    """One way, in this process: {"loss0", "seconds_per_step", "base_mib", "peak_mib"}."""
    import psutil
    import torch
    import torch.distributed as dist

    from components.train.loop import LoopSettings, initialise_engine
    from components.train.settings import trainer_defaults
    from components.train.tasks import build_task

    dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    model = {"family": "clip", "preset": preset, "vocab_size": 4096, "image_size": 64, "pad_token_id": 0,
             "bos_token_id": 1, "eos_token_id": 3}
    task = build_task({"task": "contrastive", "model": model})
    micro = batch // accum if cached else batch
    settings = LoopSettings.from_trainer(trainer_defaults(), samples=batch * steps, global_batch=batch, lr=1e-4,
                                         grad_accum=accum if cached else 1, grad_cache=cached)
    import yaml

    engine, _ = initialise_engine(task.model, settings, yaml.safe_load(open(REPO / "conf/deepspeed/zero2.yaml")),
                                  micro)
    generator = torch.Generator().manual_seed(0)
    data = {"pixels": torch.randint(0, 256, (batch, 64, 64, 3), generator=generator, dtype=torch.uint8),
            "input_ids": torch.cat([torch.ones(batch, 1, dtype=torch.int64),
                                    torch.randint(4, 4096, (batch, 14), generator=generator),
                                    torch.full((batch, 1), 3)], dim=1),
            "attention_mask": torch.ones(batch, 16, dtype=torch.int64)}
    chunks = [{k: v[i * micro:(i + 1) * micro] for k, v in data.items()} for i in range(batch // micro)]
    base = psutil.Process().memory_info().rss
    losses, times = [], []
    for _ in range(steps):
        started = time.perf_counter()
        if cached:
            loss, _ = task.cached_step(engine, chunks)
        else:
            loss, _ = task.step(engine, data)
            engine.backward(loss)
            engine.step()
        times.append(time.perf_counter() - started)
        losses.append(loss.item())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"loss0": losses[0], "seconds_per_step": sum(times[1:]) / max(1, len(times) - 1),
            "base_mib": base / 2**20, "peak_mib": peak / 2**20}


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--accum", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--way", choices=["whole", "cached"], help=argparse.SUPPRESS)  # a child process's way
    args = parser.parse_args()
    if args.way:
        import torch

        torch.set_num_threads(args.threads)
        result = run_one(args.preset, args.batch, args.accum, args.steps, args.way == "cached")
        print("RESULT " + json.dumps(result), flush=True)
        os._exit(0)  # a gloo group torn down at exit can abort the process (tests/test_deepspeed_configs.py)
    from benchmarks.report import write_results

    ways = {}
    for way in ("whole", "cached"):
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
               "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, __file__, "--way", way, "--preset", args.preset, "--batch",
                               str(args.batch), "--accum", str(args.accum), "--steps", str(args.steps), "--threads",
                               str(args.threads)], env=env, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            raise SystemExit(f"{way} failed:\n{done.stderr[-3000:]}")
        ways[way] = json.loads(next(line for line in done.stdout.splitlines()
                                    if line.startswith("RESULT ")).removeprefix("RESULT "))
    whole, cached = ways["whole"], ways["cached"]
    if abs(whole["loss0"] - cached["loss0"]) > 1e-3 * abs(whole["loss0"]):
        raise SystemExit(f"the two ways disagree on the first loss: {whole['loss0']} vs {cached['loss0']}")
    growth = {way: ways[way]["peak_mib"] - ways[way]["base_mib"] for way in ways}
    print(f"{args.preset} CLIP, one contrastive batch of {args.batch} at 64 px, ZeRO-2 on CPU, {args.threads} threads")
    for way, label in (("whole", f"whole batch of {args.batch}"),
                       ("cached", f"GradCache, {args.accum} x {args.batch // args.accum}")):
        print(f"  {label:28s} peak {ways[way]['peak_mib']:7.0f} MiB (+{growth[way]:6.0f} over the engine)  "
              f"{ways[way]['seconds_per_step']:.2f} s/step")
    print(f"  step memory growth {growth['whole'] / growth['cached']:.1f}x smaller with GradCache, step time "
          f"{cached['seconds_per_step'] / whole['seconds_per_step']:.2f}x")
    write_results({"machine": platform.platform(), "cpus": os.cpu_count(), "preset": args.preset,
                   "batch": args.batch, "accum": args.accum, "threads": args.threads, "ways": ways,
                   "growth_mib": growth, "memory_ratio": growth["whole"] / growth["cached"],
                   "time_ratio": cached["seconds_per_step"] / whole["seconds_per_step"]}, OUT)


if __name__ == "__main__":
    main()
