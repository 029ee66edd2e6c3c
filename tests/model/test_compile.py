"""``parallel.compile`` (model/compile.py): the compiled blocks compute what the eager ones do, keep the
parameter names, leave decoding with a KV cache eager, and train end to end under DeepSpeed.

Skipped, with the reason, where inductor cannot build kernels (no C++ compiler or Python headers)."""

from __future__ import annotations

import pytest
import torch

from moetrain.model.compile import compile_blocks, compile_unavailable_reason

REASON = compile_unavailable_reason(torch.device("cpu"))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(REASON is not None, reason=f"{REASON}")]


def _model():
    from moetrain.model import MoETransformer
    from moetrain.testing import tiny_model_config

    torch.manual_seed(0)
    return MoETransformer(tiny_model_config(max_seq_len=32))


def test_compiled_blocks_match_eager_and_keep_names():
    import torch._dynamo

    from moetrain.generate import generate_tokens

    eager, compiled = _model(), _model()
    names = list(compiled.state_dict())
    compile_blocks(compiled)
    assert list(compiled.state_dict()) == names  # checkpoints do not see compile
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    for model in (eager, compiled):
        out = model(ids, labels_BT=ids)
        out.loss.backward()
        model.losses = (out.lm_loss.item(), out.aux_loss.item(), out.z_loss.item())
    # the router, dispatch plan and combine compiled, the experts eager: same values to rounding
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
    grads = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        ref = grads[name].grad
        assert (p.grad - ref).norm() <= 1e-5 * ref.norm(), name

    # Decoding with a KV cache runs the eager blocks: no graph compiled, the very same tokens.
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs > 0
    eager.load_state_dict(compiled.state_dict())
    prompt = ids[0, :5]
    got = [
        generate_tokens(m, prompt, 6, generator=torch.Generator().manual_seed(2)) for m in (eager, compiled)
    ]
    assert torch.equal(got[0], got[1])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs


def test_training_with_compile_follows_the_eager_run():
    """``python -m moetrain.train parallel.compile=true`` (DeepSpeed engine, evaluation, checkpoint,
    sample) against the eager reference run: the same losses to rounding. Rounding differences grow
    over the 20 steps; a wrong gradient or routing would differ at the 1e-2 level within a few."""
    from moetrain.testing import cached_run, metric_by_step, reference_run, tiny

    ref = reference_run().check()
    run = cached_run(
        *tiny("logging.wandb.mode=offline", "trainer.sample_tokens=8", "parallel.compile=true"),
        name="compiled",
    ).check()
    assert "compile: each block through torch.compile" in run.proc.stdout
    want, got = metric_by_step(ref.run_dir), metric_by_step(run.run_dir)
    assert sorted(got) == sorted(want)
    for step, loss in want.items():
        assert got[step] == pytest.approx(loss, rel=1e-4), step
    val_want, val_got = metric_by_step(ref.run_dir, "val_loss"), metric_by_step(run.run_dir, "val_loss")
    assert val_want and sorted(val_got) == sorted(val_want)
    for step, loss in val_want.items():
        assert val_got[step] == pytest.approx(loss, rel=1e-4), step
