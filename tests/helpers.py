"""Helpers shared by tests: the default filter config, shard readers, running the real pipeline process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_FILTERS = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "filters" / "default.yaml"))


def brute_force_ranks(similarity: np.ndarray, relevant: list[set[int]]) -> np.ndarray:
    """The evaluation's retrieval ranks from their definition, a candidate at a time: 1 + the candidates scoring
    above the query's best relevant one + the irrelevant ones tied with it."""
    ranks = []
    for query, targets in enumerate(relevant):
        best = max(similarity[query, t] for t in targets)
        ahead = sum(1 for t in range(similarity.shape[1])
                    if similarity[query, t] > best or (similarity[query, t] == best and t not in targets))
        ranks.append(ahead + 1)
    return np.array(ranks)


def brute_force_retrieval_metrics(similarity: np.ndarray, pairs: list[tuple[int, int]]) -> dict[str, float]:
    """R@1/5/10 and mean/median rank both ways from brute_force_ranks (texts no image names are left out)."""
    image_to_texts = [{t for i, t in pairs if i == image} for image in range(similarity.shape[0])]
    text_to_images = [{i for i, t in pairs if t == text} for text in range(similarity.shape[1])]
    named = [text for text, images in enumerate(text_to_images) if images]
    metrics = {}
    text_ranks = brute_force_ranks(similarity.T[named], [text_to_images[t] for t in named])
    for direction, ranks in (("image_to_text", brute_force_ranks(similarity, image_to_texts)),
                             ("text_to_image", text_ranks)):
        metrics |= {f"{direction}_R{k}": float(np.mean(ranks <= k)) for k in (1, 5, 10)}
        metrics |= {f"{direction}_mean_rank": float(np.mean(ranks)),
                    f"{direction}_median_rank": float(np.median(ranks))}
    return metrics


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for servers the tests start)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    """Poll `url` until it answers 200; fail with the process's output if it exits or the time runs out."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            output = process.stdout.read() if process.stdout and process.poll() is not None else ""
            raise AssertionError(f"{what} did not come up at {url}:\n{output[-3000:]}")
        time.sleep(0.25)


@contextlib.contextmanager
def server_process(command: list[str], health_url: str, what: str, log_path: Path,
                   env: dict[str, str] | None = None, grace_s: float = 30) -> Iterator[subprocess.Popen]:
    """A server in its own process group, up once `health_url` answers 200; on exit its group gets SIGTERM, then
    SIGKILL after `grace_s`. Its output goes to `log_path`: an unread pipe fills up and then blocks the server."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            try:
                wait_for_http(health_url, process, what)
            except AssertionError as error:
                raise AssertionError(f"{error}{Path(log_path).read_text()[-3000:]}") from None
            yield process
        finally:
            _signal_group(process, signal.SIGTERM)
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # the whole group has exited already
        os.killpg(process.pid, signum)


def read_shards(shard_dir: Path) -> list[dict]:
    """Every sample of every tar, sorted by key: {"key", "txt", "json", "image"}."""
    samples: dict[str, dict] = {}
    for shard in sorted(Path(shard_dir).glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                key, suffix = member.name.rsplit(".", 1)
                data = tar.extractfile(member).read()
                sample = samples.setdefault(key, {"key": key})
                if suffix == "txt":
                    sample["txt"] = data.decode()
                elif suffix == "json":
                    sample["json"] = json.loads(data)
                else:
                    sample["image"] = data
    return [samples[k] for k in sorted(samples)]


def pretrain_args(shards: Path, work: Path, *extra: str) -> list[str]:
    """pipelines/pretrain_clip.py overrides that keep every output of a run under `work`."""
    return ["data=emoji_local", f"data.output_dir={shards}", f"export_dir={work / 'model'}",
            f"tokenizer.save_dir={work / 'tokenizers'}", f"trainer.storage_path={work / 'ray'}", "progress=false",
            *extra]


def listed(values: list[str]) -> str:
    """A Hydra list override's value with every item quoted (paths hold characters Hydra would parse)."""
    return "[" + ",".join(f'"{value}"' for value in values) + "]"


def caption_length_score(images: list[bytes], captions: list[str]) -> list[float]:
    """A stand-in scorer for the model-score hook: the caption's length."""
    return [float(len(c)) for c in captions]


# Each pipeline script's entry function (what its @hydra.main calls with the composed config).
# pipelines/<config name>.py -> the module of components/stages/ whose `run` it calls
STAGE_MODULES = {"ingest": "ingest", "pretrain_clip": "pretrain", "evaluate": "evaluate", "clip_filter": "clip_filter",
                 "distill_altclip": "altclip", "train_clipcap": "clipcap", "caption": "caption"}


def run_stage(config_name: str, *overrides: str, cwd: Path) -> Any:
    """pipelines/<config_name>.py's driver (components/stages/), called in this process from `cwd` with the config
    its command line would compose from these overrides, as pipelines/end_to_end.py calls every stage; it runs on
    this process's Ray (the session's). Returns what the driver returns. The scripts' command lines (argument
    routing, one clear line and exit code 2 on bad input) are tested through `run_pipeline`."""
    import importlib

    from components.stages.wiring import stage_config
    from pipelines import end_to_end

    run = end_to_end.end_to_end if config_name == "end_to_end" else \
        importlib.import_module(f"components.stages.{STAGE_MODULES[config_name]}").run
    with contextlib.chdir(cwd):  # relative defaults (data/..., mlflow.db) land there, as in a process started there
        return run(stage_config(config_name, list(overrides)))


def pipeline_command(args: list[str], pipeline: str) -> list[str]:
    """The command line that runs pipelines/<pipeline>.py with `args`, as a user types it."""
    return [sys.executable, str(REPO / "pipelines" / f"{pipeline}.py"), *args]


def run_pipeline(args: list[str], cwd: Path, pipeline: str = "ingest", timeout: float = 600) -> str:
    """Run a pipeline script as users do; returns its output, raising with the output on failure."""
    done = subprocess.run(pipeline_command(args, pipeline), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"{pipeline} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def kill_when(args: list[str], condition: Callable[[], bool], cwd: Path, pipeline: str = "ingest",
              timeout: float = 600) -> bool:
    """Start the pipeline, SIGKILL its whole process group once `condition()` holds; False if it ended first."""
    process = subprocess.Popen(pipeline_command(args, pipeline), cwd=cwd, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if condition():
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return True
            time.sleep(0.05)
        return False
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


def dds_of_unimplemented_pixel_format() -> bytes:
    """A DDS header whose pixel format (FourCC "ZZZZ") Pillow's DDS plugin does not implement: NotImplementedError."""
    header = struct.pack("<7I", 124, 0x1007, 4, 4, 0, 0, 0) + bytes(44)
    pixel_format = struct.pack("<2I", 32, 0x4) + b"ZZZZ" + bytes(20)
    return b"DDS " + header + pixel_format + struct.pack("<5I", 0x1000, 0, 0, 0, 0) + bytes(64)


def spider_image_of_a_missing_stack() -> bytes:
    """A SPIDER header of an image inside a stack (stack 0, image 1): Pillow's SPIDER plugin reads the stack's
    offset, which it never set: AttributeError."""
    fields = [0.0] * 28  # SPIDER counts its header fields from 1
    fields[1], fields[2], fields[5], fields[12], fields[13], fields[22], fields[23], fields[27] = 1, 4, 1, 4, 1, 108, 108, 1
    return struct.pack(">27f", *fields[1:]) + bytes(200)


PLUGIN_FAILURES = {"DDS": (dds_of_unimplemented_pixel_format(), NotImplementedError),
                   "SPIDER": (spider_image_of_a_missing_stack(), AttributeError)}


def noise_image(fmt: str, seed: int) -> bytes:
    """A 64x48 image of random pixels in Pillow's format `fmt`."""
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, fmt)
    return out.getvalue()


def mutated(data: bytes, rnd: random.Random) -> bytes:
    """`data` with 1-8 random edits: a byte flipped, a run of bytes cut out, or random bytes inserted."""
    data = bytearray(data)
    for _ in range(rnd.randint(1, 8)):
        at, op = rnd.randrange(len(data)), rnd.random()
        if op < 0.6:
            data[at] = rnd.randrange(256)
        elif op < 0.8:
            del data[at:at + rnd.randint(1, 16)]
        else:
            data[at:at] = rnd.randbytes(rnd.randint(1, 8))
    return bytes(data)


def fuzz_bodies(rnd: random.Random, per_seed: int) -> list[bytes]:
    """`per_seed` mutations of an image in each accepted format and of each plugin failure (PLUGIN_FAILURES)."""
    from components.data.images import ACCEPTED_FORMATS

    seeds = [noise_image(fmt, 0) for fmt in ACCEPTED_FORMATS] + [body for body, _ in PLUGIN_FAILURES.values()]
    return [mutated(seed, rnd) for seed in seeds for _ in range(per_seed)]


def finished_run(family: str) -> tuple[MlflowClient, Run]:
    """The store's one pretraining run of `family` (the chain's store also holds pretrain_filtered's)."""
    client = MlflowClient()
    runs = client.search_runs([mlflow.get_experiment_by_name("clipforge").experiment_id],
                              f"tags.family = '{family}' and tags.`mlflow.runName` != 'pretrain-filtered'")
    assert len(runs) == 1
    return client, runs[0]


def loss_curve(client: MlflowClient, run: Run) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss"))


def save_openai_layout_clip(directory: Path, captions: list[str], merges: int = 600, seed: int = 0) -> Path:
    """A small randomly initialised CLIP saved as OpenAI's and LAION's transformers checkpoints are: a legacy
    config (text eos_token_id 2, bos 0, pad 1; 77 positions), CLIP's BPE tokenizer files (vocab.json, merges.txt,
    tokenizer.json: the byte alphabet, the alphabet with `</w>`, the merges in order, then <|startoftext|> and
    <|endoftext|>, the last id, which also pads) trained on `captions`, and preprocessor_config.json with
    OpenAI's mean and std. Returns `directory`."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

    from components.models.base import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    clip_tokenizer = CLIPTokenizer()  # its normalizer and pre-tokenizer, to learn merges with
    learner = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    learner.normalizer = clip_tokenizer.backend_tokenizer.normalizer
    learner.pre_tokenizer = clip_tokenizer.backend_tokenizer.pre_tokenizer
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    learner.train_from_iterator(captions, trainers.BpeTrainer(
        vocab_size=2 * len(alphabet) + merges, initial_alphabet=alphabet, end_of_word_suffix="</w>",
        show_progress=False))
    learned = json.loads(learner.to_str())["model"]["merges"]
    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned]
    tokens = [*alphabet, *(a + "</w>" for a in alphabet), *(a + b for a, b in pairs),
              "<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=pairs, model_max_length=77)
    tokenizer.save_pretrained(directory)  # tokenizer.json, tokenizer_config.json; the hub's repos also have:
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in pairs))

    size = 64
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
                     "max_position_embeddings": 77, "hidden_size": 128, "num_hidden_layers": 4,
                     "num_attention_heads": 4, "intermediate_size": 512},
        vision_config={"image_size": size, "patch_size": 8, "hidden_size": 128, "num_hidden_layers": 4,
                       "num_attention_heads": 4, "intermediate_size": 512},
        projection_dim=128)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(directory)
    CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                       image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD)).save_pretrained(directory)
    return directory


CLIP_BENCHMARK_WHEELS = REPO / ".cache" / "clip_benchmark"  # `make test-deps` downloads its wheel here


def clip_benchmark_build(result_paths: list[Path], output: Path) -> None:
    """CLIP_benchmark's own `clip_benchmark build` (cli.main_build, read from its released wheel) over result files
    or directories, writing its CSV table to `output`. Only that function of its source runs: importing its module
    would import its model and dataset stacks (open_clip, torchvision), which cannot be installed beside our pins,
    and the tests reach no package index to build it an environment of its own."""
    import argparse
    import ast
    import csv
    import zipfile

    wheels = sorted(CLIP_BENCHMARK_WHEELS.glob("clip_benchmark-*.whl"))
    assert wheels, f"no CLIP_benchmark wheel in {CLIP_BENCHMARK_WHEELS}: run make test-deps"
    source = zipfile.ZipFile(wheels[-1]).read("clip_benchmark/cli.py").decode()
    (build,) = [node for node in ast.parse(source).body
                if isinstance(node, ast.FunctionDef) and node.name == "main_build"]
    namespace = {"json": json, "csv": csv, "os": os}
    exec(compile(ast.Module([build], type_ignores=[]), "clip_benchmark/cli.py", "exec"), namespace)
    namespace["main_build"](argparse.Namespace(files=[str(p) for p in result_paths], output=str(output)))
