"""Reptile meta-updates and the gradient-alignment probe."""

import json
import shutil

import pytest
import torch

import cpt
from cpt.alignment.probe import gradient_cosines
from cpt.alignment.reptile import Reptile, optimizer_params
from cpt.config import validate
from tests.conftest import tiny_config


def toy():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1))


def sgd_steps(model, opt, n, hook=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 4, generator=g)
        loss = model(x).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if hook:
            hook.after_step()


def test_meta_update_has_the_exact_value():
    model = toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    theta0 = [p.detach().clone() for p in model.parameters()]
    r = Reptile(optimizer_params(opt), k=3, beta=0.3)
    sgd_steps(model, opt, 2, r)
    inner = toy()
    inner.load_state_dict(model.state_dict())
    inner_opt = torch.optim.SGD(inner.parameters(), lr=0.1)
    sgd_steps(inner, inner_opt, 1, seed=99)
    # replay the third step on the Reptile model with the same batch, then the meta-update fires
    sgd_steps(model, opt, 1, r, seed=99)
    assert r.meta_updates == 1
    for p, p0, pk in zip(model.parameters(), theta0, inner.parameters()):
        assert torch.allclose(p, p0 + 0.3 * (pk - p0), atol=1e-7)
    for a, p in zip(r.anchor, model.parameters()):  # the anchor moved to the new weights
        assert torch.equal(a, p.detach())


def test_beta_one_is_plain_training_bit_for_bit():
    a, b = toy(), toy()
    oa = torch.optim.AdamW(a.parameters(), lr=0.01)
    ob = torch.optim.AdamW(b.parameters(), lr=0.01)
    sgd_steps(a, oa, 20)
    sgd_steps(b, ob, 20, Reptile(optimizer_params(ob), k=4, beta=1.0))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_meta_update_survives_the_next_optimizer_step_under_mixed_precision():
    """The edit lands on the fp32 weights the optimizer owns, so autocast's bf16 copies can't undo it."""
    model = toy()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    r = Reptile(optimizer_params(opt), k=2, beta=0.5)
    x = torch.randn(8, 4)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        r.after_step()
    assert r.meta_updates == 1
    after_meta = [p.detach().clone() for p in model.parameters()]
    assert all(p.dtype == torch.float32 for p in opt.param_groups[0]["params"])
    for group in opt.param_groups:
        group["lr"] = 0.0  # a step that changes nothing shows the optimizer kept the edited weights
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().pow(2).mean().backward()
    opt.step()
    for p, q in zip(model.parameters(), after_meta):
        assert torch.equal(p.detach(), q)


def test_number_of_meta_updates_is_floor_steps_over_k():
    model = toy()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    r = Reptile(optimizer_params(opt), k=7, beta=0.5, anchor_device="cpu")
    sgd_steps(model, opt, 50, r)
    assert r.meta_updates == 50 // 7
    assert r.anchor_bytes == sum(p.numel() * 4 for p in model.parameters())


def test_probe_is_one_for_identical_batches():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    rows = torch.randint(0, 50, (2, 9))
    other = torch.randint(0, 50, (2, 9))
    cos = gradient_cosines(lm, rows, {"same": rows.clone(), "other": other})
    assert cos["same"] == pytest.approx(1.0, abs=1e-5)
    assert -1 <= cos["other"] < 0.999
    assert all(p.grad is None for p in lm.parameters())  # training gradients untouched


@pytest.fixture(scope="module")
def mer_run(tmp_path_factory, small_texts):
    out = tmp_path_factory.mktemp("mer") / "run"
    cfg = validate(
        tiny_config(
            small_texts,
            # a small reservoir, so rows are overwritten between checkpoints and resume must undo them
            replay={"rate": 0.25, "buffer": {"capacity": 30, "capacity_unit": "sequences"}},
            alignment={"method": "reptile", "k": 7, "beta": 0.5, "probe_every": 10},
            checkpoint={"every": 10, "keep": 50, "task_ends": False},
        )
    )
    summary = cpt.train(cfg, out)
    return out, summary


def test_run_reports_meta_updates_and_probe(mer_run):
    out, s = mer_run
    # k counts from each task's start, and every task end meta-updates too (alignment.task_end_update)
    lengths = [b - a for a, b in zip([0] + s["task_boundaries"][:-1], s["task_boundaries"])]
    assert s["meta_updates"] == sum(n // 7 + (n % 7 > 0) for n in lengths)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(x["type"] == "meta_update" for x in lines) == s["meta_updates"]
    probes = [x for x in lines if x["type"] == "probe"]
    in_second = [p for p in probes if p["task"] == "fr"]
    assert in_second and set(in_second[0]["cosine"]) == {"en", "replay"}
    assert all(-1 <= v <= 1 for p in probes for v in p["cosine"].values())


def test_anchor_and_replay_buffer_survive_a_resume(mer_run, tmp_path):
    out, original = mer_run
    copy = tmp_path / "resumed"
    shutil.copytree(out, copy)
    ckpts = sorted((copy / "checkpoints").glob("step-*"))
    keep = [c for c in ckpts if int(c.name.split("-")[1]) % 7 != 0][len(ckpts) // 2]  # between meta-updates
    state = torch.load(keep / "state.pt", weights_only=False)
    assert state["reptile"]["steps_since_anchor"] > 0 and len(state["reptile"]["anchor"]) > 0
    for later in ckpts[ckpts.index(keep) + 1 :]:
        shutil.rmtree(later)
    (copy / "summary.json").unlink()
    resumed = cpt.train(None, copy, resume=True)
    assert resumed["loss_matrix"] == original["loss_matrix"]
    assert resumed["meta_updates"] == original["meta_updates"]
