"""The GPU-ready hot path, checked on CPU: one host read per training step, evaluation in chunks of
rows (never [batch × seq_len, vocab] logits, also under FSDP2), int32 batches, chunk size per device."""

from __future__ import annotations

import math
import socket
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

import cpt
from cpt.config import validate
from cpt.evaluate import eval_windows, heldout_loss
from cpt.model import build_model, load_model
from cpt.training.evaluator import windows_for
from cpt.training.loop import Run
from cpt.training.loss import DEFAULT_CHUNK, causal_lm_loss_sum, chunk_rows, token_cross_entropy
from tests.conftest import tiny_config

HOST_READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__", "__array__")


def _plain_heldout(model, windows, batch_size) -> tuple[float, int]:
    """Held-out (sum, count) as evaluation computed it before the chunked loss: full logits, Python floats."""
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(windows), batch_size):
            rows = torch.from_numpy(windows[start : start + batch_size])
            total += float(token_cross_entropy(model(input_ids=rows[:, :-1]).logits, rows[:, 1:], reduction="sum"))
            count += rows[:, 1:].numel()
    return total, count


@pytest.fixture(scope="module")
def counted_run(small_texts, tmp_path_factory):
    """A tiny run (grad_accum 3, replay 0.25) whose train steps count the host reads cpt's code makes.

    Every tensor-to-host conversion called from a `cpt.*` module during `Run.train_step` is counted
    (torch's own internals are not: the fused AdamW makes none); the micro-batch losses are kept to
    recompute the step's loss the way the loop did before (a Python float sum).
    """
    steps: list[dict] = []
    current: dict | None = None
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counting(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            if current is not None and sys._getframe(1).f_globals.get("__name__", "").startswith("cpt."):
                current["reads"].append((name, tuple(self.shape), self.dtype))
            return original(self, *args, **kwargs)

        return read

    original_step = Run.train_step

    def train_step(self, step):
        nonlocal current
        current = {"reads": [], "micro": [], "rows": None}
        handle = self.parallel.train_module.register_forward_hook(lambda m, args, out: current["micro"].append(out.detach().clone()))
        next_batch = self.source.next_batch

        def seen_batch(s):
            batch = next_batch(s)
            current["rows"] = (batch[0].dtype, batch[0].is_pinned(), tuple(batch[0].shape))
            return batch

        self.source.next_batch = seen_batch
        try:
            loss, tokens = original_step(self, step)
        finally:
            handle.remove()
            del self.source.next_batch
            record, current = current, None
        record["loss"], record["accum"] = loss, self.cfg.training.grad_accum
        steps.append(record)
        return loss, tokens

    mp_ = pytest.MonkeyPatch()
    for name in HOST_READS:
        mp_.setattr(torch.Tensor, name, counting(name))
    mp_.setattr(Run, "train_step", train_step)
    out = tmp_path_factory.mktemp("hot") / "run"
    cfg = validate(
        tiny_config(
            small_texts,
            tasks=[
                {"name": "en", "path": str(small_texts["en"]), "tokens": 4_000},
                {"name": "fr", "path": str(small_texts["fr"]), "tokens": 4_000},
            ],
            training={"batch_size": 2, "grad_accum": 3},
            replay={"rate": 0.25},
            checkpoint={"task_ends": False},
        )
    )
    try:
        summary = cpt.train(cfg, out)
    finally:
        mp_.undo()
    return {"steps": steps, "summary": summary, "out": out, "cfg": cfg}


def test_a_training_step_reads_the_device_once(counted_run):
    steps = counted_run["steps"]
    assert len(steps) == counted_run["summary"]["steps"] > 10
    for s in steps:
        # grad_accum 3 used to cost 3 reads (float(loss) per micro-batch); now: the packed [loss, stop] once
        assert s["reads"] == [("tolist", (2,), torch.float64)], s["reads"]
        assert len(s["micro"]) == 3


def test_the_step_loss_is_the_same_float_as_the_host_sum_of_micro_batches(counted_run):
    for s in counted_run["steps"]:
        host = 0.0
        for loss in s["micro"]:
            host += float(loss) / s["accum"]
        assert s["loss"] == host


def test_batches_are_int32_and_pinned_only_with_cuda(counted_run):
    for s in counted_run["steps"]:
        assert s["rows"] == (torch.int32, torch.cuda.is_available(), (6, 65))


def test_the_loss_matrix_is_the_full_logits_evaluation_bit_for_bit(counted_run):
    """The last row of the loss matrix, recomputed from the final checkpoint with the plain full-logits
    formula evaluation used before (the same windows, batches and float sum): the same floats."""
    cfg, summary = counted_run["cfg"], counted_run["summary"]
    model = load_model(counted_run["out"] / "checkpoints" / "final").eval()
    from cpt.data.tokenizer import cache_root, load_tokenizer
    from cpt.data.tokens import prepare_for

    tok = load_tokenizer(counted_run["out"] / "checkpoints" / "final")
    row = []
    for t in cfg.tasks:
        windows = windows_for(prepare_for(t, tok, cache_root(cfg.cache_dir)), cfg.training.seq_len, cfg.training.eval_tokens)
        total, count = _plain_heldout(model, windows, cfg.training.eval_batch_size)
        row.append(total / count)
    assert summary["loss_matrix"][-1] == row


class LargestLogits(TorchDispatchMode):
    """Records the largest [..., vocab] tensor any aten op returns while active (an observer: results unchanged)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_evaluation_holds_one_chunk_of_logits_and_equals_the_full_logits_loss(autocast):
    vocab, seq_len, batch = 2048, 256, 4
    model = build_model("tiny", vocab, eos_id=0, seq_len=seq_len, seed=3).eval()
    tokens = np.random.default_rng(0).integers(0, vocab, size=20 * seq_len + 1)
    windows = eval_windows(tokens, seq_len, 10 * seq_len)  # 10 windows: 2 batches of 4 and one of 2
    with torch.no_grad(), torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        plain, plain_count = _plain_heldout(model, windows, batch)
    with LargestLogits(vocab) as seen:
        total, count = heldout_loss(model, windows, batch, torch.device("cpu"), autocast)
    assert count == plain_count == 10 * seq_len
    assert abs(total - plain) <= 1e-6 * abs(plain)
    # a batch's logits would be batch × seq_len × vocab = 2M elements; the largest are one chunk's
    assert seen.largest == DEFAULT_CHUNK * vocab < batch * seq_len * vocab


def test_a_head_the_chunked_loss_cannot_take_falls_back_to_full_logits():
    model = build_model("tiny", 512, eos_id=0, seq_len=64, seed=1).eval()
    head = torch.nn.Linear(64, 512, bias=True)
    model.lm_head = head  # a biased head: the plain path
    rows = torch.randint(0, 512, (3, 65), generator=torch.Generator().manual_seed(0))
    want = token_cross_entropy(model(input_ids=rows[:, :-1]).logits, rows[:, 1:], reduction="sum")
    assert torch.equal(causal_lm_loss_sum(model, rows[:, :-1], rows[:, 1:]), want)


def test_chunk_rows_per_device():
    assert chunk_rows(torch.device("cpu"), 128_256) == DEFAULT_CHUNK == 256
    # CUDA: a chunk's fp32 logits ~256 MiB, rows a multiple of 64, never fewer than on CPU
    assert chunk_rows(torch.device("cuda"), 8192) == 8192
    assert chunk_rows(torch.device("cuda", 3), 128_256) == 512
    assert chunk_rows(torch.device("cuda"), 32_000) * 32_000 * 4 <= 256 << 20
    assert chunk_rows(torch.device("cuda"), 4_000_000) == DEFAULT_CHUNK


def _fsdp_eval_worker(rank, port, out):
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    vocab, seq_len, batch = 1024, 64, 2
    model = build_model("tiny", vocab, eos_id=0, seq_len=seq_len, seed=5).eval()
    tokens = np.random.default_rng(1).integers(0, vocab, size=5 * seq_len + 1)
    windows = eval_windows(tokens, seq_len, 5 * seq_len)
    reference = _plain_heldout(model, windows, batch)  # one process, unsharded, full logits
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    head_rows = []
    model.lm_head.register_forward_hook(lambda m, args, output: head_rows.append(output.shape[1]))
    # as the Evaluator does: every world-th window, as many forwards on every rank (rank 1 pads one)
    mine = windows[rank::2]
    batches = math.ceil(len(range(0, len(windows), 2)) / batch)
    total, count = heldout_loss(model, mine, batch, torch.device("cpu"), None, min_batches=batches, pad=windows[:1])
    summed = torch.tensor([total, count], dtype=torch.float64)
    dist.all_reduce(summed)
    if rank == 0:
        torch.save({"reference": reference, "sharded": summed.tolist(), "head_rows": head_rows, "batches": batches}, out)
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")
def test_fsdp2_evaluation_equals_the_unsharded_full_logits_loss(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "eval.pt"
    mp.spawn(_fsdp_eval_worker, args=(port, str(out)), nprocs=2, join=True)
    r = torch.load(out)
    (ref_total, ref_count), (total, count) = r["reference"], r["sharded"]
    assert count == ref_count == 5 * 64
    assert abs(total / count - ref_total / ref_count) <= 1e-5
    # every forward went through the chunked loss under FSDP2: the model's own lm_head saw zero rows
    assert r["head_rows"] == [0] * r["batches"]
