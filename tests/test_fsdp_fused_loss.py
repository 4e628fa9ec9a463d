"""FSDP2 training with the fused, chunked lm_head + cross-entropy: the loss and every gradient of the
unfused path, and no [tokens × vocab] logits in the forward or the backward.

Each test spawns 2 gloo ranks that run one optimizer step's forwards and backwards (2 micro-batches,
gradients synchronised on the last, as `Run.train_step` does) three ways on the same global batch:
one process on all of it with the full logits (the reference), FSDP2 with the full logits (the path
training took before), and FSDP2 through `FullySharded.wrap`'s train module (the fused path).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tests.conftest import free_port

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this build")

VOCAB, SEQ, MICRO, ACCUM, RANKS = 4096, 128, 4, 2, 2
MICRO_LOGITS = MICRO * SEQ * VOCAB  # one micro-batch's [B, T, V] logits: 2M elements


class LargestTensors(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active, and the largest whose last dim is the
    vocabulary (an observer: results unchanged). Collectives and DTensor ops count like any other."""

    def __init__(self):
        super().__init__()
        self.largest = self.largest_vocab = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.dim() and t.shape[-1] == VOCAB:
                    self.largest_vocab = max(self.largest_vocab, t.numel())
        return out


def _model(tied: bool) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    from cpt.model import llama_config

    cfg = llama_config("tiny", VOCAB, eos_id=0, seq_len=SEQ)
    cfg.tie_word_embeddings = tied
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        return LlamaForCausalLM(cfg)


def _step(loss_of, micro_batch, inputs, targets, autocast: torch.dtype | None, observe: bool = True) -> tuple[torch.Tensor, LargestTensors]:
    """One optimizer step's forwards and backwards as `Run.train_step` runs them; (this rank's loss, sizes seen).

    `observe=False` runs without the dispatch mode, under which dynamo would not run compiled code."""
    from cpt.training.device import precision

    micros = list(zip(inputs.chunk(ACCUM), targets.chunk(ACCUM)))
    total = torch.zeros((), dtype=torch.float64)
    seen = LargestTensors()
    with seen if observe else nullcontext():
        for i, (x, y) in enumerate(micros):
            with micro_batch(i == len(micros) - 1):
                with precision(torch.device("cpu"), autocast):
                    loss = loss_of(x, y)
                (loss / ACCUM).backward()
            total += loss.detach().double() / ACCUM
    return total, seen


def _full_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient (a collective for sharded ones; tied parameters once)."""
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone() for n, p in model.named_parameters()}


def _worker(rank, port, tied, compile_, autocast, out):
    from cpt.training import distributed
    from cpt.training.loss import token_cross_entropy
    from cpt.training.parallel import FullySharded

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=RANKS)
    model = _model(tied)
    rows = torch.randint(0, VOCAB, (RANKS * ACCUM * MICRO, SEQ + 1), generator=torch.Generator().manual_seed(11))
    mine = rows[rank::RANKS]

    one = copy.deepcopy(model)
    want = token_cross_entropy(one(input_ids=rows[:, :-1]).logits, rows[:, 1:])
    want.backward()

    unfused = copy.deepcopy(model)
    distributed.shard_model(unfused, mixed_bf16=autocast is not None)

    def plain(x, y):
        return token_cross_entropy(unfused(input_ids=x).logits, y)

    def plain_sync(last):
        unfused.set_requires_gradient_sync(last)
        return nullcontext()

    plain_loss, plain_seen = _step(plain, plain_sync, mine[:, :-1], mine[:, 1:].long(), autocast)

    parallel = FullySharded(torch.device("cpu"), autocast, world=RANKS)
    train_module = parallel.wrap(model, compile_=compile_)
    fused_loss, fused_seen = _step(train_module, parallel.micro_batch, mine[:, :-1], mine[:, 1:].long(), autocast, observe=not compile_)

    losses = torch.stack([plain_loss, fused_loss])
    dist.all_reduce(losses)
    result = {
        "one": {"loss": want.item(), "grads": _full_grads(one)},
        "plain": {"loss": losses[0].item() / RANKS, "rank_loss": plain_loss.item(), "grads": _full_grads(unfused)},
        "fused": {"loss": losses[1].item() / RANKS, "rank_loss": fused_loss.item(), "grads": _full_grads(model)},
        "seen": {"plain": (plain_seen.largest, plain_seen.largest_vocab), "fused": (fused_seen.largest, fused_seen.largest_vocab)},
        "tied": model.lm_head.weight is model.model.embed_tokens.weight,
        "compiled": parallel.compiled,
        "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
    }
    torch.save(result, f"{out}.{rank}")
    dist.destroy_process_group()


def _run(tmp_path: Path, tied: bool, compile_: bool, autocast: torch.dtype | None = None) -> list[dict]:
    out = tmp_path / "result"
    mp.spawn(_worker, args=(free_port(), tied, compile_, autocast, str(out)), nprocs=RANKS, join=True)
    return [torch.load(f"{out}.{r}") for r in range(RANKS)]


def _assert_equal_grads(got: dict, want: dict, tol: float) -> None:
    assert got.keys() == want.keys()
    for name, g in got.items():
        assert g.shape == want[name].shape, name
        assert (g - want[name]).abs().max().item() <= tol, (name, (g - want[name]).abs().max().item())


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fsdp2_fused_loss_equals_the_full_logits_loss_and_gradients(tmp_path, tied):
    results = _run(tmp_path, tied, compile_=False)
    for r in results:
        assert r["tied"] is tied
        assert ("lm_head.weight" in r["one"]["grads"]) is not tied  # tied: one parameter, embed_tokens.weight
        fused, plain, one = r["fused"], r["plain"], r["one"]
        assert abs(fused["rank_loss"] - plain["rank_loss"]) <= 1e-5
        assert abs(fused["loss"] - plain["loss"]) <= 1e-5 and abs(fused["loss"] - one["loss"]) <= 1e-5
        # reduce-scattered like any other: the embeddings' and lm_head's too (the root's, whose hooks had to fire)
        _assert_equal_grads(fused["grads"], plain["grads"], 1e-5)
        _assert_equal_grads(fused["grads"], one["grads"], 1e-5)
        head = one["grads"]["model.embed_tokens.weight" if tied else "lm_head.weight"]
        assert head.abs().max() > 1e-3  # a gradient that matters, not zeros on both sides
    assert results[0]["fused"]["loss"] == results[1]["fused"]["loss"]


def test_fsdp2_training_never_allocates_a_micro_batchs_logits(tmp_path):
    (r, *_) = _run(tmp_path, tied=True, compile_=False)
    from cpt.training.loss import DEFAULT_CHUNK

    plain_largest, plain_vocab = r["seen"]["plain"]
    fused_largest, fused_vocab = r["seen"]["fused"]
    # the check can fail: the full-logits path allocates [B, T, V] (and its gradient) in every micro-batch
    assert plain_vocab == plain_largest == MICRO_LOGITS
    # the fused path: one chunk of rows' logits at most, and nothing else as large as a micro-batch's logits
    assert fused_vocab == DEFAULT_CHUNK * VOCAB < MICRO_LOGITS
    assert fused_largest < MICRO_LOGITS


def test_fsdp2_fused_loss_with_compiled_layers(tmp_path):
    results = _run(tmp_path, tied=True, compile_=True)
    for r in results:
        assert r["compiled"] == ["2 decoder layers, each before FSDP2 sharding"] and r["graphs"] > 0
        assert abs(r["fused"]["loss"] - r["one"]["loss"]) <= 1e-5
        _assert_equal_grads(r["fused"]["grads"], r["one"]["grads"], 1e-5)


def test_fsdp2_fused_loss_under_bf16_mixed_precision(tmp_path):
    """`training.precision` bf16 as on CUDA: bf16 gathered weights and autocast, fp32 reduction. The fused
    path rounds differently from the full-logits one (it accumulates the lm_head gradient in fp32), so the
    gradients agree to bf16's precision, not to the bit."""
    for r in _run(tmp_path, tied=False, compile_=False, autocast=torch.bfloat16):
        fused, plain = r["fused"], r["plain"]
        assert abs(fused["loss"] - plain["loss"]) <= 1e-3 * plain["loss"]
        for name, g in fused["grads"].items():
            assert g.dtype == torch.float32  # the sharded fp32 master gradient
            assert (g - plain["grads"][name]).norm() <= 1e-2 * plain["grads"][name].norm(), name
        assert r["seen"]["fused"][1] < MICRO_LOGITS <= r["seen"]["plain"][1]
