"""Where a ZeRO stage's memory goes, without Ray: 2 processes (torch.multiprocessing, gloo on CPU, nccl on GPUs)
build the model as the training loop does, wrap it with deepspeed.initialize under conf/deepspeed/zero<N>.yaml
and take two steps of a contrastive loss on random inputs. Prints each rank-0 phase's RSS (and device memory on
GPUs) and the first step's allocations by operator (torch.profiler, profile_memory).

    python benchmarks/zero_memory_profile.py --stage 0
    python benchmarks/zero_memory_profile.py --stage 3 --preset base
    python benchmarks/zero_memory_profile.py --stage 3 --backend fake   # rank 0 of 2 alone, no communication

`fake` runs rank 0 alone against torch's fake process group: every collective is a no-op returning garbage, but
every buffer is allocated as with a real second rank, which is all a memory measurement needs. `auto` picks it
on a machine with one GPU, where two real ranks cannot run (NCCL refuses two ranks on one device, and DeepSpeed
puts rank 1 on device 1).

BENCHMARKS.md ("Memory, ZeRO-0 vs ZeRO-3") quotes its output.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MICRO_BATCH = 2
VOCAB = 8192
WORLD = 2


def phase_memory() -> dict[str, float]:
    marks = {"rss_mib": psutil.Process().memory_info().rss / 2**20,
             "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        marks["device_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return {k: round(v) for k, v in marks.items()}


def process_group_backend(requested: str) -> str:
    if requested != "auto":
        return requested
    if not torch.cuda.is_available():
        return "gloo"
    return "nccl" if torch.cuda.device_count() >= WORLD else "fake"


def worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    gpu = torch.cuda.is_available()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), DS_ACCELERATOR="cuda" if gpu else "cpu")
    if gpu:
        torch.cuda.set_device(rank % torch.cuda.device_count())
    backend = process_group_backend(args.backend)
    if backend == "fake":
        from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=WORLD)
    else:
        dist.init_process_group(backend, rank=rank, world_size=WORLD)
    import deepspeed

    from components.models.factory import build_model
    from components.train.loop import deepspeed_config, param_groups, scalars_as_vectors

    phases = {"start": phase_memory()}
    base = yaml.safe_load((REPO / "conf" / "deepspeed" / f"zero{args.stage}.yaml").read_text())
    base["bf16"] = {**base.get("bf16", {}), "enabled": gpu}
    torch.manual_seed(0)
    model = build_model("clip", args.preset, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=3)
    scalars_as_vectors(model)
    parameters = model.num_parameters()  # before ZeRO-3 partitions them away
    phases["model built"] = phase_memory()
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                      config=deepspeed_config(base, MICRO_BATCH, 1))
    phases["deepspeed.initialize"] = phase_memory()

    def step() -> None:
        pixels = torch.randn(MICRO_BATCH, 3, model.image_size, model.image_size, device=engine.device)
        ids = torch.randint(4, VOCAB, (MICRO_BATCH, 32), device=engine.device)
        ids[:, 0], ids[:, -1] = 1, 3
        image, text, _, _ = engine(pixels.to(next(engine.parameters()).dtype),
                                   {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        image, text = image[0].float(), text[0].float()
        loss = (image @ text.T).logsumexp(-1).mean() - (image * text).sum(-1).mean()
        engine.backward(loss)
        engine.step()

    table = ""
    if rank == 0:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
        with profile(activities=activities, profile_memory=True) as profiler:
            step()
        sort = "self_cuda_memory_usage" if gpu else "self_cpu_memory_usage"
        table = profiler.key_averages().table(sort_by=sort, row_limit=10)
    else:
        step()
    phases["step 1"] = phase_memory()
    started = time.perf_counter()
    step()
    phases["step 2"] = {**phase_memory(), "seconds": round(time.perf_counter() - started, 2)}
    if rank == 0:
        Path(out).write_text(json.dumps({"parameters": parameters, "phases": phases, "table": table,
                                         "backend": backend}))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", type=int, choices=(0, 1, 2, 3), default=3)
    parser.add_argument("--preset", default="base")
    parser.add_argument("--port", type=int, default=29517)
    parser.add_argument("--backend", choices=("auto", "nccl", "gloo", "fake"), default="auto",
                        help="process group: auto = nccl when each rank has its own GPU, fake on one GPU, "
                             "gloo on CPUs")
    parser.add_argument("--json", help="also write the report here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = f"{scratch}/rank0.json"
        if process_group_backend(args.backend) == "fake":
            worker(0, args, args.port, out)
        else:
            mp.spawn(worker, args=(args, args.port, out), nprocs=WORLD)
        report = json.loads(Path(out).read_text())
    if args.json:
        Path(args.json).write_text(json.dumps({"stage": args.stage, "preset": args.preset, **report}, indent=1))
    processes = "rank 0 alone" if report["backend"] == "fake" else f"{WORLD} processes"
    print(f"ZeRO-{args.stage}, {args.preset} preset ({report['parameters'] / 1e6:.0f}M parameters), world {WORLD}, "
          f"{processes} over {report['backend']}, rank 0:")
    for phase, marks in report["phases"].items():
        print(f"  {phase:<22} " + "  ".join(f"{k} {v}" for k, v in marks.items()))
    print("first step's allocations by operator (allocation volume, not live memory):")
    print(report["table"])


if __name__ == "__main__":
    main()
