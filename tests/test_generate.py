"""Sampling loop (``generate_tokens``), the KV-cache decode path and the ``moetrain.generate`` CLI."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moetrain.checkpoint import save_model_file
from moetrain.generate import _to_dashed, generate_tokens, main, sample_next_token
from moetrain.model import MoETransformer
from moetrain.model.attention import KVCache
from moetrain.testing import assert_close_scaled, rounding_rel, tiny_model_config

VOCAB = 89
# Decoding with a KV cache runs the same math on other shapes (one query row, an explicit mask, MoE
# batches of other sizes): logits agree with a full recompute to rounding, 64 ulps of their scale
# (a cache bug, e.g. a stale key or a RoPE position off by one, is off by ~1e-1 of the scale).
KV_REL = rounding_rel(64)
# Greedy decoding with and without the cache picks the same tokens as long as no step has a near-tie:
# the best logit must lead the runner-up by far more than that rounding (100x the bound).
TIE_MARGIN = 100


def _model(**kw) -> MoETransformer:
    # init_std 0.2: peaky distributions, so greedy decoding has no near-ties
    cfg = tiny_model_config(**{"vocab_size": VOCAB, "num_experts": 5, "init_std": 0.2, **kw})
    torch.manual_seed(0)
    return MoETransformer(cfg).eval()


MODELS = {
    "moe": {},
    "moe_window_mqa": {"sliding_window": 4, "num_kv_heads": 1, "top_k": 1},
    "dense": {"num_experts": 0},
}


def _prompt(B: int = 2, T: int = 5) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.numerics
@pytest.mark.parametrize("name", list(MODELS))
def test_kv_cache_logits_equal_full_recompute(name: str) -> None:
    model, ids = _model(**MODELS[name]), _prompt(T=14)
    with torch.no_grad():
        full = model(ids).logits
        caches = [KVCache() for _ in model.layers]
        steps = [model(ids[:, :6], caches=caches).logits]
        steps += [model(ids[:, t : t + 1], caches=caches).logits for t in range(6, 14)]
    assert caches[0].length == 14
    assert_close_scaled(torch.cat(steps, dim=1), full, f"{name}: cached vs full logits", rel=KV_REL)


@pytest.mark.numerics
@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_with_cache_equals_without(name: str) -> None:
    model, ids = _model(**MODELS[name]), _prompt()
    cached = generate_tokens(model, ids, 12, temperature=0.0)
    recomputed = generate_tokens(model, ids, 12, temperature=0.0, use_cache=False)
    assert cached.shape == (2, 5 + 12)
    # the precondition for exact token equality: no near-tie at any generated position
    with torch.no_grad():
        logits = model(recomputed).logits[:, 4:-1]  # the logits that chose tokens 5..16
    top2 = logits.topk(2, dim=-1).values
    gap = (top2[..., 0] - top2[..., 1]).min().item()
    assert gap > TIE_MARGIN * KV_REL * logits.abs().max().item(), f"near-tie: best leads by only {gap:.2e}"
    assert torch.equal(cached, recomputed)
    assert torch.equal(cached[:, :5], ids)


def test_exact_number_of_new_tokens_without_eos() -> None:
    model, ids = _model(), _prompt()
    g = torch.Generator().manual_seed(0)
    out = generate_tokens(model, ids, 9, temperature=1.0, top_p=0.9, eos_token_id=None, generator=g)
    assert out.shape == (2, 14) and out.dtype == torch.long
    assert int(out.min()) >= 0 and int(out.max()) < VOCAB
    one = generate_tokens(model, ids[0], 3, temperature=0.7, generator=g)
    assert one.shape == (8,)
    assert generate_tokens(model, ids, 0, temperature=1.0).shape == (2, 5)


def test_tiny_top_p_equals_greedy() -> None:
    model, ids = _model(), _prompt()
    greedy = generate_tokens(model, ids, 10, temperature=0.0)
    g = torch.Generator().manual_seed(123)
    nucleus = generate_tokens(model, ids, 10, temperature=1.5, top_p=1e-6, generator=g)
    # the same cached forward passes; top_p=1e-6 keeps only the most likely token: exact
    assert torch.equal(greedy, nucleus)


def test_seeded_sampling_is_reproducible_and_varies() -> None:
    model, ids = _model(init_std=0.02), _prompt()  # flat distributions: samples differ between seeds

    def sample(seed: int) -> torch.Tensor:
        return generate_tokens(
            model, ids, 16, temperature=1.0, top_p=1.0, generator=torch.Generator().manual_seed(seed)
        )

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


def test_stops_at_eos_and_pads_finished_rows() -> None:
    model, ids = _model(), _prompt()
    greedy = generate_tokens(model, ids, 8, temperature=0.0)
    eos = int(greedy[0, 5])  # row 0's first new token
    out = generate_tokens(model, ids, 8, temperature=0.0, eos_token_id=eos)
    if int(greedy[1, 5]) == eos:  # both rows stop at once
        assert out.shape == (2, 6)
    else:
        row1 = greedy[1, 5:].tolist()
        stop = row1.index(eos) + 1 if eos in row1 else 8
        assert out.shape == (2, 5 + stop)
        assert (out[0, 5:] == eos).all()  # finished row 0 is filled with eos
        assert torch.equal(out[1], greedy[1, : 5 + stop])


def test_training_mode_is_restored() -> None:
    model = _model()
    model.train()
    generate_tokens(model, _prompt(), 2, temperature=0.0)
    assert model.training


def test_sample_next_token_checks_arguments() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    assert sample_next_token(logits, 0.0).tolist() == [1]
    with pytest.raises(ValueError, match="temperature"):
        sample_next_token(logits, -1.0)
    with pytest.raises(ValueError, match="top_p"):
        sample_next_token(logits, 1.0, top_p=0.0)
    # top_p keeps the smallest set reaching the mass: here only the two likeliest tokens
    probs = torch.tensor([[0.5, 0.3, 0.2]]).log()
    g = torch.Generator().manual_seed(0)
    picks = {int(sample_next_token(probs, 1.0, top_p=0.75, generator=g)) for _ in range(200)}
    assert picks == {0, 1}


def test_key_value_arguments() -> None:
    argv = ["run", "prompt=a=b c", "max_new_tokens=3", "--top_p", "0.5", "temperature=0"]
    assert _to_dashed(argv) == [
        "run",
        "--prompt",
        "a=b c",
        "--max_new_tokens",
        "3",
        "--top_p",
        "0.5",
        "--temperature",
        "0",
    ]


def test_cli_on_a_checkpoint(tmp_path, capsys) -> None:
    from moetrain.data.tokenizer import train_bpe

    model = _model(vocab_size=300)
    save_model_file(model.state_dict(), tmp_path / "ckpt", {"model": dataclasses.asdict(model.cfg)})
    train_bpe(["to be or not to be", "that is the question"] * 4, vocab_size=280).save_pretrained(
        str(tmp_path / "ckpt" / "tokenizer")
    )
    args = [str(tmp_path / "ckpt"), "prompt=to be", "max_new_tokens=5", "temperature=0", "ignore_eos=true"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("to be")
    assert "5 new tokens" in captured.err
    assert main([str(tmp_path / "missing"), "prompt=x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
