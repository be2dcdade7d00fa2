"""Model FLOP utilisation (MFU) of the `base` preset training step in bf16 on one GPU.

    python benchmarks/gpu_mfu.py                      # clip, filip, clippo; base preset, batch 256
    python benchmarks/gpu_mfu.py --families clip --batch 512 --compile
    python benchmarks/gpu_mfu.py --families clip --deepspeed 0 2   # + the loop's DeepSpeed step, ZeRO-0 and ZeRO-2

What one training step does here is what a Ray Train worker does per step, minus the data pipeline and
DeepSpeed's bookkeeping: the model's forward over images and texts, our contrastive loss (InfoNCE over the batch;
FILIP's token-wise similarity), backward, gradient clipping and a fused AdamW step, under bf16 autocast with
fp32 master weights. Inputs are random tensors already on the GPU, so the number isolates model compute.

FLOPs per step are counted, not estimated: torch's FlopCounterMode records every matmul / attention / conv of
one forward + backward. MFU = counted FLOPs per second / peak. Two peaks are quoted side by side: the vendor's
dense bf16 figure for the card (H100/H200 SXM: 989 TFLOP/s) and a bf16 8192^3 matmul measured in the same run.
Needs only torch and transformers (DeepSpeed too for --deepspeed; no Ray or MLflow), so it runs on a bare GPU box.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components.models.factory import build_model  # noqa: E402
from components.train.losses import ContrastiveLoss  # noqa: E402

VENDOR_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, SXM datasheets
WARMUP_STEPS = 5
TIMED_STEPS = 20
VOCAB = 49408
OUT = "benchmarks/results/gpu_mfu.json"


def measured_matmul_tflops(size: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - started) / 1e12


def random_batch(model, batch: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    pixels = torch.randn(batch, 3, model.image_size, model.image_size, device="cuda")
    if not model.uses_tokenizer:
        return pixels, {"text_pixels": torch.randn_like(pixels)}
    length = model.max_text_length
    ids = torch.randint(1, VOCAB - 2, (batch, length), device="cuda")
    ids[:, -1] = VOCAB - 1  # every row needs its pooled eos token (the default id: base.token_ids)
    return pixels, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def count_flops(model, loss_fn: ContrastiveLoss, pixels, text) -> int:
    """FLOPs of one forward + backward, counted eagerly: the work, however it is run."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            image, texts, scale, _ = model(pixels, text)
            loss_fn(image, texts, model.similarity, scale).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def timed(step, parameters: int, batch: int, flops_per_step: int, memory_before: int) -> dict:
    """`memory_before`: what was allocated before the run built its model (an earlier run's leftovers)."""
    for _ in range(WARMUP_STEPS):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(TIMED_STEPS):
        loss = step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / TIMED_STEPS
    return {"batch": batch, "parameters_m": round(parameters / 1e6, 1),
            "gflops_per_sample": round(flops_per_step / batch / 1e9, 2),
            "step_ms": round(seconds * 1e3, 1), "samples_per_s": round(batch / seconds, 1),
            "achieved_tflops": round(flops_per_step / seconds / 1e12, 1),
            "peak_memory_gib": round((torch.cuda.max_memory_allocated() - memory_before) / 2**30, 1),
            "final_loss": round(loss.item(), 3)}


def bench_family(family: str, preset: str, batch: int, compile_model: bool) -> dict:
    memory_before = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    model = build_model(family, preset, vocab_size=VOCAB).cuda().train()
    loss_fn = ContrastiveLoss()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    forward = torch.compile(model) if compile_model else model
    pixels, text = random_batch(model, batch)

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            image, texts, scale, _ = forward(pixels, text)
            loss = loss_fn(image, texts, model.similarity, scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    flops, parameters = count_flops(model, loss_fn, pixels, text), model.num_parameters()
    return {"family": family, "preset": preset, "runner": "torch.compile" if compile_model else "eager",
            **timed(step, parameters, batch, flops, memory_before)}


def bench_deepspeed(family: str, preset: str, batch: int, stage: int) -> dict:
    """The training loop's own step (components/train/loop.py) on one rank: the task's forward and loss inside
    a DeepSpeed engine (conf/deepspeed/zero<stage>.yaml, bf16 weights with fp32 master copies), engine.backward,
    engine.step. Inputs arrive as the data pipeline delivers them (uint8 pixels, token ids) and are normalised
    on the GPU, as in the loop."""
    import deepspeed
    import yaml

    from components.train.loop import deepspeed_config, param_groups, scalars_as_vectors
    from components.train.tasks import ContrastiveTask

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29531"),
                      RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    memory_before = torch.cuda.memory_allocated()
    torch.manual_seed(0)
    model = build_model(family, preset, vocab_size=VOCAB)
    flops = count_flops(model.cuda().train(), ContrastiveLoss(), *random_batch(model, batch))
    parameters = model.num_parameters()  # before ZeRO-3 partitions them away
    scalars_as_vectors(model)
    optimizer = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-4)  # as the loop builds it
    config = yaml.safe_load((REPO / "conf" / "deepspeed" / f"zero{stage}.yaml").read_text())
    config["bf16"] = {**config.get("bf16", {}), "enabled": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(config, batch, 1))
    task = ContrastiveTask(model, ContrastiveLoss())
    pixels = torch.randint(0, 256, (batch, model.image_size, model.image_size, 3), dtype=torch.uint8, device="cuda")
    data = {"pixels": pixels}
    if not model.uses_tokenizer:
        data["text_pixels"] = torch.randint_like(pixels, 0, 256)
    else:
        data.update(random_batch(model, batch)[1])

    def step() -> torch.Tensor:
        loss, _ = task.step(engine, data)
        engine.backward(loss)
        engine.step()
        return loss

    return {"family": family, "preset": preset, "runner": f"deepspeed zero{stage}",
            **timed(step, parameters, batch, flops, memory_before)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", nargs="+", default=["clip", "filip", "clippo"])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="also time each family under torch.compile")
    parser.add_argument("--deepspeed", type=int, nargs="*", default=[], metavar="STAGE",
                        help="also time the training loop's DeepSpeed step at these ZeRO stages (one rank)")
    parser.add_argument("--out", default=OUT)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_mfu: no CUDA device (this benchmark measures GPU utilisation)")
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name()
    vendor_peak = next((v for k, v in VENDOR_PEAK_TFLOPS.items() if k in name), None)
    matmul_peak = measured_matmul_tflops()
    results = {"machine": {"gpu": name, "torch": torch.__version__, "python": platform.python_version(),
                           "vendor_bf16_tflops": vendor_peak, "measured_matmul_tflops": round(matmul_peak, 1)},
               "settings": vars(args), "runs": []}
    print(f"{name}: bf16 8192^3 matmul {matmul_peak:.0f} TFLOP/s measured, vendor peak {vendor_peak} TFLOP/s")
    print(f"{'run':30} {'params':>7} {'GFLOP/sample':>12} {'samples/s':>9} {'TFLOP/s':>8} "
          f"{'MFU vendor':>10} {'MFU matmul':>10} {'GPU mem':>8}")
    for family in args.families:
        runs = [lambda: bench_family(family, args.preset, args.batch, False)]
        if args.compile:
            runs.append(lambda: bench_family(family, args.preset, args.batch, True))
        runs += [lambda stage=stage: bench_deepspeed(family, args.preset, args.batch, stage) for stage in args.deepspeed]
        for bench in runs:
            gc.collect()
            torch.cuda.empty_cache()
            run = bench()
            run["mfu_vs_vendor_peak"] = round(run["achieved_tflops"] / vendor_peak, 3) if vendor_peak else None
            run["mfu_vs_measured_matmul"] = round(run["achieved_tflops"] / matmul_peak, 3)
            results["runs"].append(run)
            label = f"{family} {args.preset} {run['runner']}"
            vendor = f"{run['mfu_vs_vendor_peak']:.1%}" if vendor_peak else "-"
            print(f"{label:30} {run['parameters_m']:6.1f}M {run['gflops_per_sample']:12.1f} "
                  f"{run['samples_per_s']:9.1f} {run['achieved_tflops']:8.1f} {vendor:>10} "
                  f"{run['mfu_vs_measured_matmul']:10.1%} {run['peak_memory_gib']:6.1f}G", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {out}")


if __name__ == "__main__":
    main()
