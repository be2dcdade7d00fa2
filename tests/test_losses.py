"""ContrastiveLoss: hand-written references in one process, and a real 2-process gloo run that must match one process.

The distributed cases run once per module (one spawn of 2 workers, every case inside it, results in tmp files):
each worker takes its half of a fixed global batch through a tiny float64 model defined here, backward, averages
the parameter gradients with all_reduce (as DDP / DeepSpeed do) and saves loss and gradients; the tests compare
them with the same model over the whole batch in this process.
"""

from __future__ import annotations

import math
import re
import os
import socket
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from components.train.losses import ContrastiveLoss, dist_rank_world, gather_features

WORLD = 2
GLOBAL_BATCH = 8
LOCAL_BATCH = GLOBAL_BATCH // WORLD
DIM = 4
PATCHES, TOKENS = 3, 5
RTOL, ATOL = 1e-10, 1e-12


# ---------------------------------------------------------------- tiny models (float64)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def clip_similarity(image, text):
    """Dual encoder: cosine similarity of pooled embeddings."""
    return _normalise(image[0]) @ _normalise(text[0]).T


def filip_similarities(image, text):
    """Token-wise late interaction with a text mask, FILIP's two directions: (image-to-text, text-to-image)."""
    img, (txt, mask) = _normalise(image[0]), (_normalise(text[0]), text[1])
    tok = torch.einsum("ipd,jld->ijpl", img, txt)  # [n_img, n_txt, P, L]
    i2t = tok.masked_fill(~mask[None, :, None, :], float("-inf")).amax(dim=-1).mean(dim=-1)
    t2i = (tok.amax(dim=2) * mask[None]).sum(dim=-1) / mask.sum(dim=-1)[None]
    return i2t, t2i


class TinyModel(torch.nn.Module):
    """Two linear towers, a log logit scale (and a bias for SigLIP) with the recommended inits."""

    def __init__(self, arch: str, kind: str):
        super().__init__()
        self.arch = arch
        self.image_tower = torch.nn.Linear(6, DIM)
        self.text_tower = torch.nn.Linear(5, DIM)
        self.logit_scale = torch.nn.Parameter(torch.tensor(math.log(10.0 if kind == "siglip" else 1 / 0.07)))
        self.logit_bias = torch.nn.Parameter(torch.tensor(-10.0)) if kind == "siglip" else None

    def encode(self, batch):
        img_x, txt_x = batch[0], batch[1]
        image = (self.image_tower(img_x),)
        text = (self.text_tower(txt_x),) if self.arch == "clip" else (self.text_tower(txt_x), batch[2])
        return image, text

    def similarity(self, image, text):
        return (clip_similarity if self.arch == "clip" else filip_similarities)(image, text)


def make_model(arch: str, kind: str) -> TinyModel:
    torch.manual_seed(1234)
    return TinyModel(arch, kind).double()


def global_batch(arch: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(99)
    if arch == "clip":
        return (torch.randn(GLOBAL_BATCH, 6, generator=g, dtype=torch.float64),
                torch.randn(GLOBAL_BATCH, 5, generator=g, dtype=torch.float64))
    lengths = torch.randint(1, TOKENS + 1, (GLOBAL_BATCH,), generator=g)
    mask = torch.arange(TOKENS)[None] < lengths[:, None]
    return (torch.randn(GLOBAL_BATCH, PATCHES, 6, generator=g, dtype=torch.float64),
            torch.randn(GLOBAL_BATCH, TOKENS, 5, generator=g, dtype=torch.float64), mask)


@dataclass(frozen=True)
class Case:
    arch: str
    kind: str
    local_loss: bool
    gather_with_grad: bool = True
    duplicate_positives: bool = False

    @property
    def name(self) -> str:
        scope = "local" if self.local_loss else "global"
        duplicates = "-duplicates" if self.duplicate_positives else ""
        return f"{self.arch}-{self.kind}-{scope}-{'grad' if self.gather_with_grad else 'nograd'}{duplicates}"


# The global batch's captions for duplicate_positives: rows 0 and 2 share one (on rank 0), rows 1 and 5 another
# (across the ranks), rows 4 and 7 a third (on rank 1).
CAPTION_IDS = torch.tensor([10, 11, 10, 12, 13, 11, 14, 13])
EXACT_CASES = [Case(a, k, loc, duplicate_positives=dup) for a in ("clip", "filip") for k in ("infonce", "siglip")
               for loc in (False, True) for dup in (False, True)]
NOGRAD_CASES = [Case("clip", "infonce", False, False), Case("clip", "infonce", True, False),
                Case("clip", "siglip", False, False), Case("clip", "siglip", True, False)]


def run_case(case: Case) -> dict:
    """Loss and parameter grads on this process's share of the global batch (all of it when not distributed)."""
    rank, world = dist_rank_world()
    model = make_model(case.arch, case.kind)
    n = GLOBAL_BATCH // world
    local = tuple(t[rank * n:(rank + 1) * n] for t in global_batch(case.arch))
    image, text = model.encode(local)
    loss_fn = ContrastiveLoss(case.kind, local_loss=case.local_loss, gather_with_grad=case.gather_with_grad,
                              duplicate_positives=case.duplicate_positives)
    caption_ids = CAPTION_IDS[rank * n:(rank + 1) * n] if case.duplicate_positives else None
    loss = loss_fn(image, text, model.similarity, model.logit_scale, model.logit_bias, caption_ids)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    loss_mean = loss.detach().clone()
    if world > 1:
        for g in grads.values():
            dist.all_reduce(g)
            g /= world
        dist.all_reduce(loss_mean)
        loss_mean /= world
    return {"loss": loss.item(), "loss_mean": loss_mean.item(), "grads": grads}


# ---------------------------------------------------------------- the 2-process run


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    out = Path(out_dir) / f"rank{rank}.pt"
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        results = {c.name: run_case(c) for c in EXACT_CASES + NOGRAD_CASES}
        # gather_features itself: rank order, masks included, and the local slice is the local tensor
        local = tuple(t[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH] for t in global_batch("filip"))
        results["gathered"] = gather_features(local, gather_with_grad=False)
        # backward of the differentiable gather: each rank's slice gets the SUM of every rank's gradient for it,
        # also when the incoming gradient is not contiguous (torch's deprecated nn.functional.all_gather got this
        # wrong on gloo)
        x = torch.arange(LOCAL_BATCH * 6, dtype=torch.float64).reshape(LOCAL_BATCH, 3, 2).add(rank).requires_grad_()
        def upstream(k):  # rank k's gradient w.r.t. the gathered [8, 3, 2] tensor, with permuted strides
            g = torch.arange(2 * 3 * GLOBAL_BATCH, dtype=torch.float64) * (k + 1)
            return g.reshape(2, 3, GLOBAL_BATCH).permute(2, 1, 0)
        assert not upstream(rank).is_contiguous()
        gather_features((x,))[0].backward(upstream(rank))
        want = sum(upstream(k) for k in range(world))[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH]
        results["gather_grad"] = (x.grad.clone(), want.contiguous())
        # unequal local batches must fail loudly on every rank
        try:
            x = torch.zeros(LOCAL_BATCH + rank, DIM, dtype=torch.float64)
            gather_features((x,))
            results["unequal"] = None
        except ValueError as e:
            results["unequal"] = str(e)
        dist.destroy_process_group()
        torch.save(results, out)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, out)
        raise


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("dist_losses")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, WORLD, port, str(out_dir))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = []
    for r in range(WORLD):
        path = out_dir / f"rank{r}.pt"
        assert path.exists(), f"worker {r} left no result (exit codes {[p.exitcode for p in procs]})"
        res = torch.load(path, weights_only=False)
        assert "error" not in res, f"worker {r} failed:\n{res['error']}"
        results.append(res)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return results


def _assert_grads_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=RTOL, atol=ATOL, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", EXACT_CASES, ids=lambda c: c.name)
def test_two_workers_match_single_process(dist_results, case):
    ref = run_case(case)  # no process group here: the whole batch in one process
    for r, res in enumerate(dist_results):
        got = res[case.name]
        assert got["loss_mean"] == pytest.approx(ref["loss"], rel=RTOL)
        if not case.local_loss:  # every rank computes the whole global loss
            assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL), f"rank {r}"
        _assert_grads_close(got["grads"], ref["grads"])


@pytest.mark.parametrize("case", [c for c in NOGRAD_CASES if not c.local_loss], ids=lambda c: c.name)
def test_global_loss_without_gather_grad_scales_tower_grads_by_one_over_world(dist_results, case):
    """Each rank only backpropagates its own (identical) loss into its own features: tower grads come out 1/W."""
    ref = run_case(Case(case.arch, case.kind, case.local_loss))
    got = dist_results[0][case.name]
    assert got["loss"] == pytest.approx(ref["loss"], rel=RTOL)  # the forward is the same
    for name, g in got["grads"].items():
        if name.startswith(("logit_scale", "logit_bias")):
            torch.testing.assert_close(g, ref["grads"][name], rtol=RTOL, atol=ATOL)
        else:
            assert not torch.allclose(g, ref["grads"][name], rtol=1e-3, atol=1e-8), name
            torch.testing.assert_close(g, ref["grads"][name] / WORLD, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("case", [c for c in NOGRAD_CASES if c.local_loss], ids=lambda c: c.name)
def test_local_loss_without_gather_grad_gives_wrong_grads(dist_results, case):
    """The other ranks' loss terms never reach this rank's features: tower grads are wrong, not just rescaled.

    (SigLIP's local loss uses only local images, so the image tower happens to stay exact; its gathered texts don't.)
    """
    ref = run_case(Case(case.arch, case.kind, case.local_loss))
    got = dist_results[0][case.name]
    assert got["loss_mean"] == pytest.approx(ref["loss"], rel=RTOL)
    wrong = ["text_tower.weight"]
    if case.kind == "siglip":
        _assert_grads_close({"image_tower.weight": got["grads"]["image_tower.weight"]},
                            {"image_tower.weight": ref["grads"]["image_tower.weight"]})
    else:
        wrong.append("image_tower.weight")
    for name in wrong:
        g, want = got["grads"][name], ref["grads"][name]
        assert not torch.allclose(g, want, rtol=1e-3, atol=1e-8), name
        assert not torch.allclose(g, want / WORLD, rtol=1e-3, atol=1e-8), name


def test_gather_features_concatenates_in_rank_order(dist_results):
    full = global_batch("filip")
    for res in dist_results:
        gathered = res["gathered"]
        assert len(gathered) == 3 and gathered[2].dtype == torch.bool
        for g, f in zip(gathered, full):
            assert torch.equal(g, f)


def test_gather_with_grad_sums_gradients_onto_the_producing_rank(dist_results):
    for res in dist_results:
        got, want = res["gather_grad"]
        assert torch.equal(got, want)


def test_unequal_local_batches_raise_on_every_rank(dist_results):
    for res in dist_results:
        assert res["unequal"] is not None and "same feature shapes" in res["unequal"]
        assert "(4, 4)" in res["unequal"] and "(5, 4)" in res["unequal"]


# ---------------------------------------------------------------- single process


def _embeddings(n: int = 5, d: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


def test_infonce_matches_explicit_softmax_cross_entropy():
    img, txt = _embeddings()
    scale = 1 / 0.07
    log_scale = torch.tensor(math.log(scale), dtype=torch.float64)
    loss = ContrastiveLoss("infonce")((img,), (txt,), clip_similarity, log_scale)
    s = clip_similarity((img,), (txt,)).tolist()
    n = len(s)
    rows = [-math.log(math.exp(scale * s[i][i]) / sum(math.exp(scale * s[i][j]) for j in range(n))) for i in range(n)]
    cols = [-math.log(math.exp(scale * s[j][j]) / sum(math.exp(scale * s[i][j]) for i in range(n))) for j in range(n)]
    assert loss.item() == pytest.approx((sum(rows) / n + sum(cols) / n) / 2, rel=1e-12)


def test_filip_infonce_takes_each_direction_over_its_own_similarity():
    """FILIP's loss (Yao et al. 2021, eq. 4-5) written from the paper, one pair and one token at a time: the
    image-to-text softmax over s^I_ij (each patch's best real token of text j, averaged over patches), the
    text-to-image softmax over s^T_ij (each real token's best patch of image i, averaged over real tokens). The
    model's `loss_similarity` through ContrastiveLoss must give the same number; padding holds large values."""
    from components.models.filip import FILIP

    g = torch.Generator().manual_seed(3)
    n, patches, length = 5, 4, 6
    image = F.normalize(torch.randn(n, patches, DIM, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(n, length, DIM, generator=g, dtype=torch.float64), dim=-1)
    mask = (torch.arange(length)[None] < torch.tensor([6, 2, 4, 1, 3])[:, None]).to(torch.float64)
    text[mask == 0] = 10.0
    scale = 1 / 0.07

    def dot(i: int, p: int, j: int, t: int) -> float:
        return float(image[i, p] @ text[j, t])

    real = [[t for t in range(length) if mask[j, t]] for j in range(n)]
    s_image = [[sum(max(dot(i, p, j, t) for t in real[j]) for p in range(patches)) / patches for j in range(n)]
               for i in range(n)]
    s_text = [[sum(max(dot(i, p, j, t) for p in range(patches)) for t in real[j]) / len(real[j]) for j in range(n)]
              for i in range(n)]

    def cross_entropy(logits: list[float], positive: int) -> float:
        return -math.log(math.exp(logits[positive]) / sum(math.exp(v) for v in logits))

    image_to_text = sum(cross_entropy([scale * s_image[i][j] for j in range(n)], i) for i in range(n)) / n
    text_to_image = sum(cross_entropy([scale * s_text[i][j] for i in range(n)], j) for j in range(n)) / n
    model = FILIP.__new__(FILIP)  # loss_similarity reads no parameter
    loss = ContrastiveLoss("infonce")((image,), (text, mask), model.loss_similarity,
                                      torch.tensor(math.log(scale), dtype=torch.float64))
    assert loss.item() == pytest.approx((image_to_text + text_to_image) / 2, rel=1e-12)


def test_siglip_matches_reference_loop():
    img, txt = _embeddings(n=6)
    scale, bias = 10.0, -10.0
    log_scale, bias_t = torch.tensor(math.log(scale), dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)
    loss = ContrastiveLoss("siglip")((img,), (txt,), clip_similarity, log_scale, bias_t)
    s = clip_similarity((img,), (txt,)).tolist()
    n = len(s)
    total = 0.0
    for i in range(n):  # per image: sum over all texts
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += -math.log(1 / (1 + math.exp(-z * (scale * s[i][j] + bias))))
    assert loss.item() == pytest.approx(total / n, rel=1e-12)  # mean over images


def test_duplicate_positives_spread_each_rows_target_over_its_duplicates():
    """UniCL's label-based targets written from the formula, one row at a time: row i's loss is the mean over the
    columns j with i's caption of -log softmax_j, in both directions."""
    img, txt = _embeddings(n=6)
    ids = torch.tensor([7, 3, 7, 5, 3, 7])
    scale = 1 / 0.07
    log_scale = torch.tensor(math.log(scale), dtype=torch.float64)
    loss = ContrastiveLoss("infonce", duplicate_positives=True)((img,), (txt,), clip_similarity, log_scale,
                                                                caption_ids=ids)
    s, c, n = clip_similarity((img,), (txt,)).tolist(), ids.tolist(), len(ids)

    def direction(score) -> float:  # score(row, column)
        total = 0.0
        for i in range(n):
            log_norm = math.log(sum(math.exp(scale * score(i, k)) for k in range(n)))
            same = [j for j in range(n) if c[j] == c[i]]
            total += -sum(scale * score(i, j) - log_norm for j in same) / len(same)
        return total / n

    want = (direction(lambda i, j: s[i][j]) + direction(lambda j, i: s[i][j])) / 2
    assert loss.item() == pytest.approx(want, rel=1e-12)
    # Every caption once: CLIP's loss exactly; the duplicates change it.
    plain = ContrastiveLoss("infonce")((img,), (txt,), clip_similarity, log_scale).item()
    distinct = ContrastiveLoss("infonce", duplicate_positives=True)(
        (img,), (txt,), clip_similarity, log_scale, caption_ids=torch.arange(n)).item()
    assert distinct == pytest.approx(plain, rel=1e-12) and abs(loss.item() - plain) > 1e-3


def test_siglip_labels_duplicate_captions_positive():
    img, txt = _embeddings(n=5)
    ids = torch.tensor([1, 2, 1, 3, 2])
    scale, bias = 10.0, -10.0
    loss = ContrastiveLoss("siglip", duplicate_positives=True)(
        (img,), (txt,), clip_similarity, torch.tensor(math.log(scale), dtype=torch.float64),
        torch.tensor(bias, dtype=torch.float64), caption_ids=ids)
    s, c, n = clip_similarity((img,), (txt,)).tolist(), ids.tolist(), len(ids)
    total = sum(-math.log(1 / (1 + math.exp(-(1.0 if c[i] == c[j] else -1.0) * (scale * s[i][j] + bias))))
                for i in range(n) for j in range(n))
    assert loss.item() == pytest.approx(total / n, rel=1e-12)


def test_text_ids_are_equal_exactly_for_equal_texts():
    from components.models.text import text_ids

    tokens = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 0], [5, 6, 8, 0], [5, 6, 7, 9]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]])
    ids = text_ids(tokens, mask).tolist()
    assert ids[0] == ids[1] == ids[3] != ids[2]  # what lies under the padding does not count
    pixels = torch.zeros(3, 4, 6, 3, dtype=torch.uint8)
    pixels[2, 1, 1, 0] = 255
    ids = text_ids(pixels).tolist()
    assert ids[0] == ids[1] != ids[2]


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_logit_scale_clamped_at_100(kind):
    img, txt = _embeddings()
    bias = torch.tensor(-10.0, dtype=torch.float64)
    fn = ContrastiveLoss(kind)
    big = torch.tensor(math.log(1000.0), dtype=torch.float64, requires_grad=True)
    at_max = torch.tensor(math.log(100.0), dtype=torch.float64)
    small = torch.tensor(math.log(20.0), dtype=torch.float64, requires_grad=True)
    loss_big = fn((img,), (txt,), clip_similarity, big, bias)
    assert loss_big.item() == pytest.approx(fn((img,), (txt,), clip_similarity, at_max, bias).item(), rel=1e-12)
    loss_big.backward()
    assert big.grad.item() == 0.0  # clamped: no gradient pushes the scale further
    fn((img,), (txt,), clip_similarity, small, bias).backward()
    assert small.grad.item() != 0.0
    custom = ContrastiveLoss(kind, max_logit_scale=50.0)
    assert custom((img,), (txt,), clip_similarity, big, bias).item() == pytest.approx(
        fn((img,), (txt,), clip_similarity, torch.tensor(math.log(50.0), dtype=torch.float64), bias).item(), rel=1e-12)


@pytest.mark.parametrize("kind", ["infonce", "siglip"])
def test_local_loss_is_the_same_in_one_process(kind):
    img, txt = _embeddings()
    scale_bias = torch.tensor(2.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    args = ((img,), (txt,), clip_similarity, *scale_bias)
    assert ContrastiveLoss(kind, local_loss=True)(*args).item() == ContrastiveLoss(kind)(*args).item()


def test_low_precision_similarity_is_scored_in_float32():
    img, txt = (t.to(torch.bfloat16) for t in _embeddings())
    loss = ContrastiveLoss("infonce")((img,), (txt,), clip_similarity, torch.tensor(2.0))
    assert loss.dtype == torch.float32


def test_gather_features_is_identity_without_process_group():
    feats = _embeddings()
    assert dist_rank_world() == (0, 1)
    assert gather_features(feats) is feats
    assert gather_features(feats, gather_with_grad=False) is feats


def test_bad_arguments():
    img, txt = _embeddings()
    with pytest.raises(ValueError, match="unknown loss kind"):
        ContrastiveLoss("triplet")
    with pytest.raises(ValueError, match="logit_bias"):
        ContrastiveLoss("siglip")((img,), (txt,), clip_similarity, torch.tensor(2.0))
    with pytest.raises(ValueError, match="pairs must align"):
        ContrastiveLoss()((img,), (txt[:3],), clip_similarity, torch.tensor(2.0))
    with pytest.raises(ValueError, match="duplicate_positives needs caption_ids"):
        ContrastiveLoss(duplicate_positives=True)((img,), (txt,), clip_similarity, torch.tensor(2.0))
    with pytest.raises(ValueError, match="similarity returned shape"):
        ContrastiveLoss()((img,), (txt,), lambda a, b: clip_similarity(a, b)[:, :2], torch.tensor(2.0))


@pytest.mark.parametrize("override, message", [
    ("loss.duplicate_positives=maybe", "loss.duplicate_positives must be true or false, got 'maybe'"),
    ("loss.kind=triplet", "unknown loss kind 'triplet'"),
    ("model.temperature_init=0.001", "model.temperature_init=0.001: use a temperature in [0.01, 1]"),
])
def test_a_bad_loss_or_temperature_setting_is_refused_before_anything_starts(tmp_path, override, message):
    from tests.helpers import run_stage

    with pytest.raises(ValueError, match=re.escape(message)):
        run_stage("pretrain_clip", "data=emoji_local", f"data.output_dir={tmp_path / 'shards'}",
                  f"data.corpus_dir={tmp_path / 'corpus'}", "progress=false", override, cwd=tmp_path)
    assert not (tmp_path / "shards").exists() and not (tmp_path / "corpus").exists()  # nothing ingested
