"""LoRA fine-tuning end to end on a tiny random Mixtral (model.init_from): the checkpoint holds the
adapters only (<= half the base weights file), the merged export loads in transformers and differs
from the base, the PEFT adapter on the base gives the merged model's logits, the same on 2 ranks
with ep_size=2; step 1 is the base model's loss exactly; resume is bit-exact; a changed or missing
base is one error line; a LoRA run's peak memory is far below full fine-tuning's."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moetrain.checkpoint import read_model_state, read_optimizer_state
from moetrain.testing import (
    assert_equivalent,
    cached_run,
    describe,
    offline_env,
    run_command,
    run_tool_in_process,
    run_train,
    tiny,
    tiny_hf_model,
)

STEPS = 4
LORA = ("model.lora.rank=4", "model.lora.alpha=8", "model.lora.targets=[attention,experts]")
_BASE: dict[str, Path] = {}


def _base(tmp_path_factory) -> Path:
    if "base" not in _BASE:
        folder = tmp_path_factory.mktemp("lora-base")
        tiny_hf_model("mixtral", folder, hidden_size=64, intermediate_size=128)
        _BASE["base"] = folder
    return _BASE["base"]


def _args(base: Path, *extra: str) -> list[str]:
    return tiny(
        f"model.init_from={base}",
        f"trainer.max_steps={STEPS}",
        "trainer.checkpoint_every=2",
        "trainer.eval_every=0",
        "optim.warmup_steps=1",
        *extra,
    )


def _export(run: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "moetrain.export", str(run), str(out), *flags]
    return run_command(cmd, env=offline_env(), timeout=180)


def _export_in_process(run: Path, out: Path, *flags: str) -> subprocess.CompletedProcess:
    """The same command through export's main(argv), without a new interpreter (where only the exit
    code and the files count; the one-error-line checks below keep the real process)."""
    return run_tool_in_process("moetrain.export", str(run), str(out), *flags)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def _check_exports(run: Path, base: Path, tmp: Path) -> None:
    """Merged export loads and differs from the base; PEFT adapter on the base == merged (<= 1e-4)."""
    import peft
    from transformers import AutoModelForCausalLM

    for out, flags in ((tmp / "merged", ()), (tmp / "adapter", ("--adapter",))):
        proc = _export_in_process(run, out, *flags)
        assert proc.returncode == 0, describe(proc)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {
        p.name for p in (tmp / "adapter").iterdir()
    }
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    base_model = AutoModelForCausalLM.from_pretrained(str(base)).eval()
    merged = _logits(AutoModelForCausalLM.from_pretrained(str(tmp / "merged")).eval(), ids)
    before = _logits(base_model, ids)
    assert (merged - before).abs().max() > 1e-3  # the fine-tune changed the model
    adapted = _logits(peft.PeftModel.from_pretrained(base_model, str(tmp / "adapter")).eval(), ids)
    assert (adapted - merged).abs().max() <= 1e-4
    from moetrain.checkpoint import load_model  # generate / analyze: the base + adapters, merged

    ours = _logits(load_model(run, load_tokenizer=False).model, ids)
    assert (ours - merged).abs().max() <= 1e-4


@pytest.mark.numerics
def test_lora_run_checkpoint_exports_and_step_one_is_the_base_loss(tmp_path_factory, tmp_path) -> None:
    pytest.importorskip("peft")
    base = _base(tmp_path_factory)
    lora = cached_run(*_args(base, *LORA), name="lora").check()
    full = cached_run(*_args(base), name="lora-full").check()
    # zero-initialised B: the first step's loss is the base model's, bit for bit
    assert lora.by_step("loss")[1] == full.by_step("loss")[1]
    assert lora.by_step("loss")[STEPS] != full.by_step("loss")[STEPS]
    ckpt = lora.step_dir(STEPS)
    stored = sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())
    base_file = (base / "model.safetensors").stat().st_size
    assert stored <= 0.5 * base_file, (stored, base_file)
    names = set(read_model_state(ckpt))
    assert names and all("_lora_" in n for n in names)  # adapters only, no base weight
    ref = json.loads((ckpt / "trainer_state.json").read_text())["lora_base"]
    assert ref["path"] == str(base.resolve()) and len(ref["sha256"]) == 64
    _check_exports(lora.run_dir, base, tmp_path)


def test_lora_resume_is_bit_exact(tmp_path_factory, tmp_path) -> None:
    base = _base(tmp_path_factory)
    """Resumed from the uninterrupted run's step-2 checkpoint (adapters + their optimizer state, the
    base re-read from model.init_from): steps 3-4 and the final state equal the uninterrupted run's."""
    whole = cached_run(*_args(base, *LORA), name="lora").check()
    src = whole.step_dir(2)
    second = run_train(tmp_path, *_args(base, *LORA, f"trainer.resume={src}"), timeout=240)
    assert second.returncode == 0, describe(second)
    assert f"resumed from {src} at step 2" in second.stdout, describe(second)
    ref = whole.by_step("loss")
    records = map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
    resumed = {r["step"]: r["loss"] for r in records if "loss" in r}  # (step 0: the base's validation)
    assert sorted(s for s in resumed if s > 0) == list(range(3, STEPS + 1))
    assert all(resumed[s] == ref[s] for s in range(3, STEPS + 1))
    step = f"checkpoints/step_{STEPS:08d}"
    for read in (read_model_state, read_optimizer_state):
        a, b = read(tmp_path / step), read(whole.run_dir / step)
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), read.__name__


def test_changed_or_missing_base_is_one_error_line(tmp_path_factory, tmp_path) -> None:
    base = tmp_path / "base"
    shutil.copytree(_base(tmp_path_factory), base)
    run = tmp_path / "run"
    proc = run_train(run, *tiny(f"model.init_from={base}", "trainer.max_steps=2", "trainer.eval_every=0",
                                *LORA), timeout=240)  # fmt: skip
    assert proc.returncode == 0, describe(proc)
    weights = load_file(str(base / "model.safetensors"))
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1.5
    save_file(weights, str(base / "model.safetensors"), metadata={"format": "pt"})
    for proc in (
        _export(run, tmp_path / "out"),
        run_train(
            run,
            *tiny(
                f"model.init_from={base}",
                "trainer.max_steps=3",
                "trainer.eval_every=0",
                "trainer.resume=auto",
                *LORA,
            ),
            timeout=240,
        ),  # fmt: skip
    ):
        assert proc.returncode != 0, describe(proc)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "changed" in lines[0], describe(proc)
    shutil.rmtree(base)
    proc = _export(run, tmp_path / "out")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "missing" in lines[0], describe(proc)


@pytest.mark.multiprocess
@pytest.mark.numerics
def test_lora_on_two_ranks_with_expert_parallelism(tmp_path_factory, tmp_path) -> None:
    pytest.importorskip("peft")
    base = _base(tmp_path_factory)
    one = cached_run(*_args(base, *LORA), name="lora").check()
    two = cached_run(*_args(base, *LORA, "optim.micro_batch_size=2", "parallel.ep_size=2"), nproc=2,
                     name="lora-ep2").check()  # fmt: skip
    assert_equivalent(two, one, range(1, STEPS + 1), grad_norm=True, weights_step=STEPS)
    _check_exports(two.run_dir, base, tmp_path)


_PEAK = """
import resource, sys, torch
from moetrain.config import LoRAConfig
from moetrain.model import MoETransformer
from moetrain.model.lora import apply_lora
from moetrain.testing import tiny_model_config
torch.manual_seed(0)
cfg = tiny_model_config(vocab_size=512, hidden_size=256, num_layers=2, num_heads=8, num_kv_heads=4,
                        ffn_hidden_size=1024, num_experts=8)
model = MoETransformer(cfg)
if sys.argv[1] == "lora":
    apply_lora(model, LoRAConfig(rank=8, targets=["attention", "experts"]))
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
ids = torch.randint(0, 512, (2, 64))
with open("/proc/self/statm") as f:  # resident now: imports + the model, before training allocates
    before = int(f.read().split()[1]) * resource.getpagesize()
for _ in range(1):
    model(ids, ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
model(ids, ids).loss.backward()  # the gradients as a step holds them, beside the optimizer's state
state = sum(p.grad.nbytes for p in model.parameters() if p.grad is not None)
state += sum(t.nbytes for st in opt.state.values() for t in st.values() if torch.is_tensor(t))
print(peak - before, state, sum(p.numel() for p in model.parameters()))
"""


@pytest.mark.slow
def test_lora_peak_memory_is_far_below_full_fine_tuning() -> None:
    """The same ~13M-parameter model trained one step, full vs LoRA: the training state a step holds
    (gradients + AdamW moments, 12 bytes a trainable parameter) and what training adds to the
    process's peak RSS. The state is exact and asserted; RSS (allocator and thread-pool noise when
    the machine is loaded) is printed for the record."""
    rss, state = {}, {}
    for mode in ("full", "lora"):
        proc = run_command([sys.executable, "-c", _PEAK, mode], env=offline_env(), timeout=180)
        assert proc.returncode == 0, describe(proc)
        rss[mode], state[mode], params = map(int, proc.stdout.split())
    print(
        f"training's peak RSS: full +{rss['full'] / 2**20:.0f} MiB, LoRA +{rss['lora'] / 2**20:.0f} MiB; "
        f"grads + AdamW state: full {state['full'] / 2**20:.0f} MiB, LoRA {state['lora'] / 2**20:.1f} MiB"
    )
    assert state["full"] >= 12 * 0.95 * params  # every parameter trains: 4 + 8 bytes each
    assert state["lora"] <= 0.05 * state["full"], state  # adapters only: the base holds no state
