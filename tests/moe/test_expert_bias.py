"""Aux-loss-free balancing, sigmoid scores and the sequence-wise balance loss, against hand computations.

- the expert bias chooses the experts but the combine weights stay the unbiased scores;
- sigmoid scores: top-k by sigmoid, weights renormalised over the chosen (DeepSeek-V3);
- the bias after a few optimizer steps equals a reference written from the definition
  (``b += u * sign(mean load - load)`` on the all-reduced counts of the step's micro-batches);
- the bias is fp32 state (buffer, saved, restored, kept fp32 under a bf16 cast, zero after a meta build);
- DeepSeek-V3's sequence-wise balance loss by hand numbers, and its place in the total loss;
- metrics and the export refusals.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from moetrain.config import ConfigError, MoEConfig
from moetrain.hf import hf_architecture
from moetrain.model import MoETransformer
from moetrain.moe import sequence_balance_loss
from moetrain.moe.router import TopKRouter
from moetrain.testing import assert_close_scaled, rounding_rel, tiny_model_config
from moetrain.tracking import expert_bias_metrics

# Hand numbers: a handful of fp32 operations (exp, sum, divide) against Python's float64; 8 ulps.
HAND_REL = rounding_rel(8)
U = 0.01  # bias update rate in these tests: a wrong sign or a missed update is off by 0.01-0.02


def router_with_logits(logits: list[list[float]], k: int, **kw) -> tuple[TopKRouter, torch.Tensor]:
    """A router whose gate reproduces ``logits`` exactly: H = E, gate = identity, x = logits."""
    E = len(logits[0])
    r = TopKRouter(E, E, k, MoEConfig(**kw))
    with torch.no_grad():
        r.gate.weight.copy_(torch.eye(E))
    return r, torch.tensor(logits, dtype=torch.float32)


def test_bias_chooses_weights_stay_unbiased():
    logits = [[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 1.0, 0.2]]
    r, x = router_with_logits(logits, k=2, bias_update_rate=U)
    with torch.no_grad():
        r.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))  # expert 3 always wins a slot
    out = r(x)
    for n, row in enumerate(logits):
        z = [math.exp(v) for v in row]
        p = [v / sum(z) for v in z]
        best = max(range(3), key=lambda e: p[e])  # the other slot: best unbiased among 0..2
        chosen = sorted(zip(out.expert_ids_NK[n].tolist(), out.weights_NK[n].tolist()))
        assert [e for e, _ in chosen] == sorted([best, 3])
        want = {best: p[best] / (p[best] + p[3]), 3: p[3] / (p[best] + p[3])}
        for e, w in chosen:
            assert w == pytest.approx(want[e], rel=HAND_REL), (n, e)
        assert out.probs_NE[n].tolist() == pytest.approx(p, rel=HAND_REL)
    # Negative control: without the bias expert 3 is never chosen.
    plain, _ = router_with_logits(logits, k=2)
    assert 3 not in plain(x).expert_ids_NK.flatten().tolist()


def test_zero_bias_routes_exactly_like_no_bias():
    torch.manual_seed(0)
    x = torch.randn(64, 16)
    a, b = TopKRouter(16, 8, 2), TopKRouter(16, 8, 2, MoEConfig(bias_update_rate=U))
    b.gate.load_state_dict(a.gate.state_dict())
    ra, rb = a(x), b(x)
    assert ra.expert_ids_NK.equal(rb.expert_ids_NK)
    assert ra.weights_NK.equal(rb.weights_NK)  # gather of the same scores: bit for bit


@pytest.mark.parametrize("normalize", [True, False])
def test_sigmoid_scores(normalize: bool):
    logits = [[2.0, -1.0, 0.5, 1.5], [-3.0, 0.1, 0.2, -0.5]]
    r, x = router_with_logits(logits, k=2, score_function="sigmoid", normalize_top_k=normalize)
    out = r(x)
    for n, row in enumerate(logits):
        s = [1 / (1 + math.exp(-v)) for v in row]
        top = sorted(range(4), key=lambda e: -s[e])[:2]
        assert out.expert_ids_NK[n].tolist() == top
        denom = (s[top[0]] + s[top[1]]) if normalize else 1.0
        assert out.weights_NK[n].tolist() == pytest.approx([s[e] / denom for e in top], rel=HAND_REL)
        # probs (for the balance losses and entropy): sigmoid normalised over all experts (s')
        assert out.probs_NE[n].tolist() == pytest.approx([v / sum(s) for v in s], rel=HAND_REL)


def _reference_counts(model: MoETransformer, ids: torch.Tensor, ref_bias: list[torch.Tensor]) -> torch.Tensor:
    """Selected copies per (layer, expert) for one forward, recomputed from each router's input with
    the reference bias: softmax of x W^T, + bias, top-k by a Python sort."""
    inputs: list[torch.Tensor] = []
    hooks = [
        layer.router.gate.register_forward_hook(lambda m, a, o: inputs.append(a[0].detach()))
        for layer in model.moe_layers
    ]
    was_training = model.training
    model.eval()  # an eval forward is not counted (same routing: no jitter or dropout here)
    with torch.no_grad():
        model(ids)
    model.train(was_training)
    for h in hooks:
        h.remove()
    E, k = model.cfg.num_experts, model.cfg.top_k
    counts = torch.zeros(len(inputs), E, dtype=torch.float64)
    for li, (x, layer) in enumerate(zip(inputs, model.moe_layers, strict=True)):
        probs = torch.softmax((x @ layer.router.gate.weight.T).double(), dim=-1) + ref_bias[li].double()
        for row in probs.tolist():
            for e in sorted(range(E), key=lambda e: -row[e])[:k]:
                counts[li, e] += 1
    return counts


def test_bias_update_matches_hand_reference():
    """3 optimizer steps of 2 micro-batches; the all-reduce adds a fixed 'other rank' load, so the
    test also shows the update uses the reduced (global) counts, once per step for all layers."""
    torch.manual_seed(0)
    cfg = tiny_model_config(moe=MoEConfig(bias_update_rate=U, aux_loss_weight=0.0))
    model = MoETransformer(cfg).train()
    with torch.no_grad():  # decisive, uneven routing (no near-ties between reference and model)
        for layer in model.moe_layers:
            layer.router.gate.weight.normal_(0.0, 1.0)
    L, E = len(model.moe_layers), cfg.num_experts
    other_rank = torch.arange(L * E, dtype=torch.float64).view(L, E) * 3.0
    calls: list[tuple[int, ...]] = []

    def all_reduce(t: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(t.shape))
        assert t.dtype == torch.float64
        return t + other_rank

    ref_bias = [torch.zeros(E, dtype=torch.float64) for _ in range(L)]
    gen = torch.Generator().manual_seed(1)
    for _step in range(3):
        step_counts = torch.zeros(L, E, dtype=torch.float64)
        for _micro in range(2):
            ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=gen)
            step_counts += _reference_counts(model, ids, ref_bias)
            model.train()
            model(ids)
            model.eval()
            model(ids)  # eval forwards (validation, generation) are not counted
            model.train()
        glob = step_counts + other_rank
        for li in range(L):
            ref_bias[li] += U * torch.sign(glob[li].mean() - glob[li])
        model.after_optimizer_step(all_reduce=all_reduce)
    assert calls == [(L, E)] * 3
    got = model.expert_biases()
    assert list(got) == cfg.moe_layer_ids
    for li, b in enumerate(got.values()):
        want = ref_bias[li]
        assert b.dtype == torch.float32
        # fp32 accumulation of 3 steps of +-U: a few ulps of 3U; a wrong sign is off by 2U
        assert torch.allclose(b.double(), want, rtol=0, atol=rounding_rel(4) * 3 * U), (li, b, want)
    moved = torch.cat([b for b in ref_bias])
    assert (moved > 0).any() and (moved < 0).any(), "the test must move biases both ways"
    # No counts since the last update: a further call changes nothing.
    before = [b.clone() for b in got.values()]
    model.after_optimizer_step(all_reduce=all_reduce)
    assert all(a.equal(b) for a, b in zip(before, model.expert_biases().values(), strict=True))


def test_activation_checkpointing_counts_each_micro_batch_once():
    torch.manual_seed(0)
    cfg = tiny_model_config(moe=MoEConfig(bias_update_rate=U))
    model = MoETransformer(cfg).train()
    model.activation_checkpointing = True
    ids = torch.randint(0, cfg.vocab_size, (2, 16))
    model(ids, ids).loss.backward()  # backward recomputes each block's forward
    counts = model._bias_counts_LE
    assert counts is not None
    assert counts.sum(-1).tolist() == [2 * 16 * cfg.top_k] * len(model.moe_layers)


def test_bias_is_fp32_state_saved_and_restored():
    torch.manual_seed(0)
    cfg = tiny_model_config(moe=MoEConfig(bias_update_rate=U))
    model = MoETransformer(cfg)
    names = [f"layers.{i}.ffn.router.expert_bias" for i in cfg.moe_layer_ids]
    sd = model.state_dict()
    assert all(n in sd for n in names)
    assert not any("expert_bias" in n for n, _ in model.named_parameters())  # no grad, no weight decay
    values = torch.tensor([1e-3, -2e-3, 3.0001e-3, 0.0])[: cfg.num_experts]
    for layer in model.moe_layers:
        layer.router.expert_bias.copy_(values)
    model.to(torch.bfloat16)  # what DeepSpeed's bf16 mode does to the module
    for layer in model.moe_layers:
        assert layer.router.expert_bias.dtype == torch.float32
        assert layer.router.expert_bias.equal(values), "bf16 would round 3.0001e-3"
    other = MoETransformer(cfg)
    other.load_state_dict(model.float().state_dict(), strict=True)
    assert all(layer.router.expert_bias.equal(values) for layer in other.moe_layers)
    # off: no bias in the model (old checkpoints and exports unchanged)
    assert not any("expert_bias" in n for n in MoETransformer(tiny_model_config()).state_dict())


def test_meta_build_starts_with_zero_bias():
    cfg = tiny_model_config(moe=MoEConfig(bias_update_rate=U))
    with torch.device("meta"):
        model = MoETransformer(cfg)
    model.to_empty(device="cpu")
    for layer in model.moe_layers:
        layer.router.expert_bias.fill_(float("nan"))  # what uninitialised memory may hold
    model.reset_parameters()
    assert all(layer.router.expert_bias.eq(0).all() for layer in model.moe_layers)


def test_sequence_balance_loss_by_hand():
    # B=2 sequences, T=2 tokens, E=3 experts, k=1
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.2, 0.6, 0.2]])
    ids = torch.tensor([[0], [0], [2], [1]])
    E, K, T = 3, 1, 2
    want = 0.0
    for rows in [(0, 1), (2, 3)]:
        counts = [sum(1 for n in rows if ids[n, 0] == e) for e in range(E)]
        f = [E / (K * T) * c for c in counts]
        P = [sum(probs[n, e].item() for n in rows) / T for e in range(E)]
        want += sum(fi * pi for fi, pi in zip(f, P)) / 2
    assert sequence_balance_loss(probs, ids, 2, 2).item() == pytest.approx(want, rel=HAND_REL)
    # perfect balance in every sequence: 1.0 (the same normalisation as the switch loss)
    uniform = torch.full((6, 3), 1 / 3)
    assert sequence_balance_loss(uniform, torch.tensor([[0], [1], [2]] * 2), 2, 3).item() == pytest.approx(
        1.0, rel=HAND_REL
    )
    # Each sequence on one expert (0, then 1), scores agreeing: per sequence f = (3, 0, 0), P_0 = 0.8,
    # so 3 * 0.8 = 2.4, while the batch-level switch loss of the same batch is only
    # 3 * (0.5 * 0.45 + 0.5 * 0.45) = 1.35: the sequence loss sees the per-sequence imbalance.
    peaked = torch.tensor([[0.8, 0.1, 0.1]] * 3 + [[0.1, 0.8, 0.1]] * 3)
    one_each = torch.tensor([[0]] * 3 + [[1]] * 3)
    assert sequence_balance_loss(peaked, one_each, 2, 3).item() == pytest.approx(2.4, rel=HAND_REL)


def test_sequence_loss_in_total_loss():
    torch.manual_seed(0)
    w = 0.5
    cfg = tiny_model_config(moe=MoEConfig(seq_aux_loss_weight=w, score_function="sigmoid"))
    model = MoETransformer(cfg)
    ids = torch.randint(0, cfg.vocab_size, (3, 8))
    out = model(ids, ids)
    per_layer = [s.seq_aux_loss for s in out.router_stats]
    assert all(v is not None for v in per_layer)
    assert out.seq_aux_loss.item() == pytest.approx(torch.stack(per_layer).mean().item(), rel=HAND_REL)
    m = cfg.moe
    want = (
        out.lm_loss + m.aux_loss_weight * out.aux_loss + m.z_loss_weight * out.z_loss + w * out.seq_aux_loss
    )
    assert out.loss.item() == pytest.approx(want.item(), rel=HAND_REL)
    out.seq_aux_loss.backward()
    assert model.moe_layers[0].router.gate.weight.grad.abs().max() > 0  # it trains the router
    # off by default: not computed
    plain = MoETransformer(tiny_model_config())(ids, ids)
    assert plain.seq_aux_loss is None and all(s.seq_aux_loss is None for s in plain.router_stats)


def test_config_validation():
    for field, value in [
        ("score_function", "tanh"),
        ("bias_update_rate", -1e-3),
        ("seq_aux_loss_weight", -1.0),
    ]:
        with pytest.raises(ConfigError, match=f"model.moe.{field}="):
            MoEConfig(**{field: value}).validate()


def test_bias_metrics():
    biases = {1: torch.tensor([0.002, -0.001, 0.0, 0.001]), 3: torch.tensor([-0.003, 0.003, 0.0, 0.0])}
    m = expert_bias_metrics(biases)
    assert m["moe/layer_1/expert_bias"] == [0.002, -0.001, 0.0, 0.001]
    assert m["moe/layer_3/expert_bias_min"] == pytest.approx(-0.003)
    assert m["moe/layer_3/expert_bias_max"] == pytest.approx(0.003)
    assert m["moe/layer_3/expert_bias_spread"] == pytest.approx(0.006)
    cfg = tiny_model_config(moe=MoEConfig(bias_update_rate=U))
    model = MoETransformer(cfg)
    keys = model.routing_state_metrics()
    assert [k for k in keys if k.endswith("/expert_bias")] == [
        f"moe/layer_{i}/expert_bias" for i in cfg.moe_layer_ids
    ]
    assert MoETransformer(tiny_model_config()).routing_state_metrics() == {}


def test_export_refuses_what_mixtral_cannot_hold():
    cfg = tiny_model_config()
    assert hf_architecture(cfg) == "MixtralForCausalLM"
    sig = dataclasses.replace(cfg, moe=MoEConfig(score_function="sigmoid"))
    with pytest.raises(ValueError, match="score_function=sigmoid") as e:
        hf_architecture(sig)
    assert "\n" not in str(e.value)
    biased = dataclasses.replace(cfg, moe=MoEConfig(bias_update_rate=U))
    with pytest.raises(ValueError, match="no expert-selection bias.*--drop-expert-bias") as e:
        hf_architecture(biased)
    assert "\n" not in str(e.value)


def test_export_cli_refuses_the_bias_or_drops_it_with_a_warning(tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from moetrain.checkpoint import save_model_file
    from moetrain.export import main as export_main

    torch.manual_seed(0)
    cfg = tiny_model_config(moe=MoEConfig(bias_update_rate=U))
    model = MoETransformer(cfg).eval()
    for layer in model.moe_layers:
        layer.router.expert_bias.copy_(torch.tensor([0.3, -0.3, 0.0, 0.1]))
    save_model_file(model.state_dict(), tmp_path / "ckpt", {"model": dataclasses.asdict(cfg)})
    assert export_main([str(tmp_path / "ckpt"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "--drop-expert-bias" in err and "\n" not in err
    assert not (tmp_path / "out").exists()

    assert export_main([str(tmp_path / "ckpt"), str(tmp_path / "out"), "--drop-expert-bias"]) == 0
    err = capsys.readouterr().err
    assert "warning: dropped the expert-selection bias of 2 MoE layers (largest |bias| 0.3)" in err
    assert not any("bias" in k for k in load_file(str(tmp_path / "out" / "model.safetensors")))
    # The export is the same model without the bias: routing from the unbiased scores.
    unbiased = MoETransformer(dataclasses.replace(cfg, moe=MoEConfig())).eval()
    unbiased.load_state_dict({k: v for k, v in model.state_dict().items() if "expert_bias" not in k})
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 12))
    with torch.no_grad():
        got, want, biased = hf(ids).logits, unbiased(ids).logits, model(ids).logits
    # transformers' own kernels: 64 ulps of the logits' scale (as tests/test_export.py)
    assert_close_scaled(got, want, "exported logits", rel=rounding_rel(64))
    # ...and the trained (biased) model routes differently, which is why the flag is needed
    assert (got - biased).abs().max() > 1e3 * rounding_rel(64) * biased.abs().max()
