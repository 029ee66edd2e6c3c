"""End to end: ``python -m moetrain.train +experiment=mixtral_tiny`` trains offline and leaves a
complete run directory; bad input fails fast with one ``error:`` line; stopping and checkpointing.

The reference run (20 steps, eval and checkpoint every 10, W&B offline) is shared with the resume,
data-parallel and expert-parallel tests (``moetrain.testing.reference_run``).
"""

from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path

import pytest
import torch
import yaml

from moetrain.checkpoint import read_model_state
from moetrain.checkpoint.checkpointer import Checkpointer
from moetrain.checkpoint.integrity import verify
from moetrain.checkpoint.model_file import resolve_checkpoint
from moetrain.checkpoint.save_errors import SavePolicy
from moetrain.testing import describe, read_metrics, reference_run, rounding_rel, run_train, tiny

NUM_EXPERTS = 4  # configs/model/mixtral_tiny.yaml
MOE_LAYERS = (0, 1)
STEPS = 20


@pytest.fixture(scope="module")
def ref():
    return reference_run().check()


def test_loss_falls(ref):
    records = read_metrics(ref.run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)), "log_every=1: one record per step"
    first, last = records[0]["lm_loss"], records[-1]["lm_loss"]
    assert math.isfinite(first) and math.isfinite(last)
    assert first > math.log(512) - 0.5, f"step 1 should be near chance (ln 512 = 6.24), got {first}"
    assert last < first - 0.3, f"lm_loss did not fall: {first:.3f} -> {last:.3f}"
    vals = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    assert vals[20] < vals[10], f"validation loss did not fall: {vals}"


def test_metrics_contract(ref):
    records = read_metrics(ref.run_dir)
    tokens_per_step = 4 * 64  # global batch 4 sequences of seq_len 64
    moe_cfg = yaml.safe_load((ref.run_dir / ".hydra" / "config.yaml").read_text())["model"]["moe"]
    aux_w, z_w = moe_cfg["aux_loss_weight"], moe_cfg["z_loss_weight"]
    assert aux_w > 0 and z_w > 0
    for r in records:
        for key in ("step", "loss", "lm_loss", "aux_loss", "lr", "tokens_per_sec"):
            assert key in r, f"step {r.get('step')}: {key} missing from {sorted(r)}"
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), (key, r[key])
        assert r["tokens_per_sec"] > 0 and r["lr"] > 0
        assert r["tokens"] == r["step"] * tokens_per_step
        # the logged loss is lm + w_aux * aux + w_z * z, formed in fp32 from the same fp32 parts: a
        # few roundings of a value ~6 (16 ulps of it allowed; a missing or double-weighted term is
        # off by >= w_z * z ~ 1e-3)
        want = r["lm_loss"] + aux_w * r["aux_loss"] + z_w * r["z_loss"]
        assert r["loss"] == pytest.approx(want, rel=rounding_rel(16))
        for i in MOE_LAYERS:
            frac = r[f"moe/layer_{i}/expert_fraction"]
            assert isinstance(frac, list) and len(frac) == NUM_EXPERTS
            assert all(0 <= f <= 1 for f in frac)
            # each fraction is logged rounded to 6 decimals (+-5e-7): their sum and max are off by
            # at most NUM_EXPERTS x 5e-7 from the exact ones
            assert sum(frac) == pytest.approx(1.0, abs=NUM_EXPERTS * 1e-6)
            # a ratio of integer counts (max / mean): >= 1 up to its own rounding
            assert r[f"moe/layer_{i}/imbalance"] >= 1.0 - rounding_rel(2)
            assert r[f"moe/layer_{i}/imbalance"] == pytest.approx(
                max(frac) * NUM_EXPERTS, abs=NUM_EXPERTS * 1e-6
            )
            # the mean of per-token entropies (each <= ln E in exact arithmetic, fp32): a few ulps over
            assert 0.0 <= r[f"moe/layer_{i}/entropy"] <= math.log(NUM_EXPERTS) * (1 + rounding_rel(8))
        assert f"moe/layer_{len(MOE_LAYERS)}/expert_fraction" not in r
    evals = {r["step"]: r for r in records if "val_loss" in r}
    assert sorted(evals) == [10, 20], "eval_every=10"
    for r in evals.values():
        # val_ppl is math.exp of the same float64 val_loss, and JSON round-trips float64 exactly
        assert math.exp(r["val_loss"]) == r["val_ppl"]
    # the LR warms up over 2 steps, then decays
    lrs = [r["lr"] for r in records]
    assert lrs[0] < lrs[1] and lrs[-1] < lrs[1]


def test_run_directory(ref):
    run_dir = ref.run_dir
    hydra_cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert hydra_cfg["model"]["name"] == "mixtral_tiny"
    ckpts = run_dir / "checkpoints"
    latest = ckpts / "latest"
    assert latest.is_file()
    target = ckpts / latest.read_text().strip()
    assert target.name == "step_00000020" and target.is_dir()
    assert resolve_checkpoint(run_dir) == target
    for name in (
        "model.safetensors.index.json",
        "model-00001-of-00001.safetensors",
        "config.yaml",
        "trainer_state.json",
        "optimizer.safetensors.index.json",
        "rank_state/rank_00000.json",
    ):
        assert (target / name).is_file(), f"{name} missing from {target}"
    assert (target / "tokenizer").is_dir() and any((target / "tokenizer").iterdir())
    state = json.loads((target / "trainer_state.json").read_text())
    assert state["step"] == 20 and state["world_size"] == 1 and state["ep_size"] == 1
    assert state["tokens_seen"] == 20 * 4 * 64
    # keep_last=2 (default): steps 10 and 20; no temporary folders left behind
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000010", "step_00000020"]
    assert not list(ckpts.glob(".tmp-*"))

    png = run_dir / "routing_heatmap.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    with Image.open(png) as im:
        im.verify()
        assert im.size[0] > 50 and im.size[1] > 50
    assert (run_dir / "sample.txt").is_file() and (run_dir / "sample.txt").read_text().strip()


def test_wandb_offline_and_no_network(ref):
    offline = list((ref.run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1, f"expected one wandb/offline-run-* folder, found {offline}"
    assert list(offline[0].glob("*.wandb")), "no offline W&B record file"
    # every run goes through a proxy that refuses connections: an HTTP attempt would show up here
    out = ref.proc.stdout + ref.proc.stderr
    for needle in ("127.0.0.1:9", "ProxyError", "Max retries exceeded", "ConnectionError"):
        assert needle not in out, f"network access attempted: {needle!r}\n{describe(ref.proc)}"


# ---- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("model.top_k=9", "model.top_k"),
        ("parallel.ep_size=3", "parallel.ep_size"),
        ("trainer.resume=/nonexistent", "trainer.resume"),
    ],
)
def test_bad_input_fails_fast(tmp_path: Path, override: str, field: str):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = run_train(tmp_path / "run", *tiny(override), timeout=120)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU seconds of the child, not wall time: on a loaded 2-core machine the wall clock of the same
    # work doubles (seen: 10.8 s wall for 4.4 s of CPU), while building the model and data would cost
    # far more CPU than the imports (~2-5 s)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert proc.returncode == 2, describe(proc)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, describe(proc)
    assert field in errors[0], errors[0]
    assert "Traceback" not in proc.stderr, describe(proc)
    # nothing expensive ran: no model was built (the banner), no engine, no checkpoint
    assert "moetrain: mixtral_tiny" not in proc.stdout, (
        f"the model was built before failing\n{describe(proc)}"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert cpu < 10, f"failing took {cpu:.1f} s of CPU"


# ---- stopping --------------------------------------------------------------------------------------
def test_stop_after_minutes(tmp_path: Path):
    run_dir = tmp_path / "run"
    proc = run_train(
        run_dir,
        *tiny("trainer.max_steps=5", "trainer.stop_after_minutes=0.0001", "trainer.checkpoint_every=0"),
    )
    assert proc.returncode == 0, describe(proc)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1], "stops after the first step"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000001"
    assert (run_dir / "checkpoints" / "step_00000001" / "model.safetensors.index.json").is_file()


# ---- atomic checkpoints (in-process, world size 1, no process group) ------------------------------
class FakeTokenizer:
    """Writes its folder in two parts; with ``fail`` set, raises between them (a crash mid-save)."""

    def __init__(self) -> None:
        self.fail = False

    def save_pretrained(self, path: str) -> None:
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "part1.json").write_text("{}")
        if self.fail:
            raise RuntimeError("simulated crash while saving")
        (folder / "part2.json").write_text("{}")


class _PlainView:
    """OptimizerView's reading interface over a module with no optimizer state yet."""

    gathers = False  # masters are views of the live parameters, as for an unpartitioned optimizer

    def master(self, p):
        return p.detach()

    def state_keys(self):
        return []

    def step_count(self):
        return 0.0


def _checkpointer(root: Path, **kw) -> Checkpointer:
    kw = {"async_save": False, **kw}
    policy = SavePolicy("continue", 3, 1000)
    return Checkpointer(
        root=root, rank=0, world_size=1, ep_size=1, keep_last=2, policy=policy, log=print, **kw
    )


def _save(ck: Checkpointer, tokenizer: FakeTokenizer, step: int, model=None) -> Path | None:
    model = model or torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        model.weight.fill_(float(step))
    ck.save(
        step,
        model=model,
        view=_PlainView(),
        weights_finite=True,
        trainer_state={"step": step},
        loader_state={"position": step},
        config={"model": {"name": "fake"}},
        tokenizer=tokenizer,
    )
    ck.wait()  # the background write (async) is joined here; sync saves are already done
    last = ck.last_saved
    return last if last is not None and last.name == f"step_{step:08d}" else None


def _complete(folder: Path, step: int) -> None:
    for name in ("model.safetensors.index.json", "config.yaml", "trainer_state.json", "tokenizer/part2.json"):
        assert (folder / name).is_file(), f"{folder / name} missing"
    assert verify(folder) is None
    assert json.loads((folder / "trainer_state.json").read_text())["step"] == step
    assert torch.equal(read_model_state(folder)["weight"], torch.full((2, 3), float(step)))


class _BadTensor(torch.nn.Module):
    """A module whose state cannot be written (a dtype safetensors has no name for)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2, 3))
        self.register_buffer("odd", torch.zeros(2, dtype=torch.complex64))


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("where", ["tokenizer", "tensor"])
def test_failed_save_keeps_previous_checkpoint(tmp_path: Path, where: str, async_save: bool, capsys):
    import torch.distributed as dist

    assert not dist.is_initialized()  # collectives are no-ops
    root = tmp_path / "checkpoints"
    ck = _checkpointer(root, async_save=async_save)
    tokenizer = FakeTokenizer()
    first = _save(ck, tokenizer, 1)
    assert first == root / "step_00000001"
    _complete(first, 1)

    if where == "tokenizer":
        tokenizer.fail = True
        assert _save(ck, tokenizer, 2) is None
    else:
        assert _save(ck, tokenizer, 2, model=_BadTensor()) is None
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("error: checkpoint of step 2 failed"))
    assert "free in" in line and "latest stays step_00000001" in line, line
    assert ("simulated crash" if where == "tokenizer" else "KeyError") in line, line
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert resolve_checkpoint(root) == first
    assert not (root / "step_00000002").exists(), "a failed save must not leave a final step folder"
    assert not list(root.glob(".tmp-*")), "the partial folder is removed"
    _complete(first, 1)

    tokenizer.fail = False
    third = _save(ck, tokenizer, 3)
    assert (root / "latest").read_text().strip() == "step_00000003" and third == root / "step_00000003"
    _complete(third, 3)
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000001", "step_00000003"]
    assert not os.path.exists(root / ".latest.tmp")
