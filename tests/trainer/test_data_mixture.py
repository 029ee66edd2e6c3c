"""Training on a weighted mixture, on token files, and with document masking, end to end.

- three local sources at 0.6 / 0.3 / 0.1: after 20 steps each source's share of the training tokens
  (metrics.jsonl, data/tokens/<domain>) is within 3 points of its weight (the schedule keeps it within
  one block: 1/80 here), val_loss/<domain> is logged; resumed from its step-10 checkpoint, steps 11-20
  are exactly those of the uninterrupted run;
- expert parallelism over 2 processes with masking on trains like one process (and the mixture gives
  both the same blocks: the data/tokens counts are equal); the same run without masking (the mixture
  run above, shared) trains differently;
- data.on_exhausted=stop ends the run with a checkpoint when a source is read to its end;
- token files written by python -m moetrain.data.prepare train to the same losses as the fixture;
- a 600 MB uint16 token file trains with peak RSS under 200 MB above the same run on the fixture.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from moetrain.data.corpus import SPLITS
from moetrain.testing import (
    REPO_ROOT,
    TrainRun,
    assert_equivalent,
    cached_run,
    check_ok,
    describe,
    offline_env,
    read_metrics,
    reference_run,
    run_command,
    run_train,
    tiny,
    train_command,
)

FIXTURE = REPO_ROOT / "moetrain" / "data" / "fixture"
WEIGHTS = {"literature": 0.6, "code": 0.3, "docs": 0.1}


@pytest.fixture(scope="module")
def domain_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The fixture corpus's train split, one local jsonl file per domain."""
    root = tmp_path_factory.mktemp("sources")
    lines: dict[str, list[str]] = {d: [] for d in WEIGHTS}
    for line in (FIXTURE / f"{SPLITS[0]}.jsonl").read_text().splitlines():
        lines[json.loads(line)["domain"]].append(line + "\n")
    for d, ls in lines.items():
        (root / f"{d}.jsonl").write_text("".join(ls))
    return {d: root / f"{d}.jsonl" for d in WEIGHTS}


def mixture(files: dict[str, Path], weights: dict[str, float] = WEIGHTS) -> list[str]:
    items = ", ".join(
        f"{{name: json, data_files: '{files[d]}', weight: {w}, domain: {d}}}" for d, w in weights.items()
    )
    return ["data.name=mixture", f"data.sources=[{items}]"]


def shares(record: dict) -> dict[str, float]:
    tokens = {d: record[f"data/tokens/{d}"] for d in WEIGHTS}
    return {d: n / sum(tokens.values()) for d, n in tokens.items()}


def mixture_run(files: dict[str, Path]) -> TrainRun:
    """The uninterrupted 20-step mixture run (mixtral_tiny: eval and checkpoint every 10), shared by the
    share / resume test and, as the masking-off run, by the masking test's negative control."""
    return cached_run(*tiny(*mixture(files)), name="mixture").check()


@pytest.mark.slow
def test_mixture_shares_and_exact_resume_mid_mixture(domain_files, tmp_path: Path):
    whole = mixture_run(domain_files)
    last = whole.metrics()[-1]
    assert last["step"] == 20 and last["tokens"] == sum(last[f"data/tokens/{d}"] for d in WEIGHTS)
    blocks = 20 * 4  # steps x micro-batch 4 (one process)
    for d, share in shares(last).items():
        assert abs(share - WEIGHTS[d]) <= 0.03, (d, share)
        assert abs(share - WEIGHTS[d]) <= 1 / blocks + 1e-12  # the schedule's own bound: one block
    assert {f"val_loss/{d}" for d in WEIGHTS} <= set(last)
    assert "mixture: literature 0.600" in whole.proc.stdout

    # resumed mid-mixture from the uninterrupted run's step-10 checkpoint: the same blocks from 11 on
    run_dir = tmp_path / "resumed"
    proc = check_ok(run_train(run_dir, *tiny(*mixture(domain_files), f"trainer.resume={whole.step_dir(10)}")))
    assert "at step 10" in proc.stdout, describe(proc)
    resumed = {r["step"]: r for r in read_metrics(run_dir)}
    keys = ["loss", "lm_loss", "aux_loss", "grad_norm", *(f"data/tokens/{d}" for d in WEIGHTS)]
    assert sorted(s for s in resumed if s > 0) == list(range(11, 21))
    for r in whole.metrics():
        if r["step"] > 10:
            assert {k: resumed[r["step"]][k] for k in keys} == {k: r[k] for k in keys}, r["step"]
    assert resumed[20]["val_loss"] == last["val_loss"]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.numerics
def test_ep2_with_document_masking_equals_one_process(domain_files):
    common = (*mixture(domain_files), "data.document_masking=true")
    one = cached_run(*tiny(*common), name="mask-ep1").check()
    two = cached_run(
        *tiny(*common, "optim.micro_batch_size=2", "parallel.ep_size=2"), nproc=2, name="mask-ep2"
    ).check()
    assert "document masking: attention inside each document" in one.proc.stdout
    assert "world 2 (ep 2" in two.proc.stdout
    assert_equivalent(
        two, one, range(1, 21), keys=("loss", "lm_loss", "aux_loss"), val_steps=[10, 20], weights_step=20
    )
    for d in WEIGHTS:  # the same blocks at world size 1 and 2
        assert one.by_step(f"data/tokens/{d}") == two.by_step(f"data/tokens/{d}")
    # masking changes the training (negative control: it is on); the plain mixture run is shared
    plain = mixture_run(domain_files)
    assert plain.by_step("loss")[20] != one.by_step("loss")[20]


def test_on_exhausted_stop_ends_the_run_with_a_checkpoint(domain_files, tmp_path: Path):
    small = tmp_path / "small.jsonl"  # ~15 training blocks of 65 tokens: read through in ~8 steps
    small.write_text("".join(json.dumps({"text": f"to be or not to be, {i} " * 20}) + "\n" for i in range(6)))
    files = {**domain_files, "docs": small}
    proc = check_ok(
        run_train(
            tmp_path / "run",
            *tiny(*mixture(files, {"literature": 0.5, "docs": 0.5}), "data.on_exhausted=stop"),
        )
    )
    assert "source 'docs' is read to its end (data.on_exhausted=stop)" in proc.stdout
    records = read_metrics(tmp_path / "run")
    assert 0 < records[-1]["step"] < 20
    assert records[-1]["data/epochs/docs"] == 1  # read exactly once: one complete pass, nothing more
    assert (tmp_path / "run" / "checkpoints" / f"step_{records[-1]['step']:08d}").is_dir()


@pytest.fixture(scope="module")
def prepared_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "tokens"
    proc = run_command(
        [sys.executable, "-m", "moetrain.data.prepare", str(out), "data=fixture", "--no-progress"],
        env=offline_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "data.name=tokens data.data_files=" in proc.stdout
    return out


@pytest.mark.slow
def test_prepared_token_files_train_like_the_fixture_loader(prepared_fixture: Path):
    reference = reference_run().check()
    tokens = cached_run(
        *tiny(
            "logging.wandb.mode=offline",
            "trainer.sample_tokens=8",
            "data.name=tokens",
            f"data.data_files={prepared_fixture}",
        ),
        name="tokens",
    ).check()
    for key in ("loss", "lm_loss", "grad_norm", "val_loss"):
        assert tokens.by_step(key) == reference.by_step(key), key


def _peak_rss_mib(run_dir: Path, *overrides: str) -> float:
    """Peak resident memory (MiB) of one training process (ru_maxrss of the child, in a wrapper)."""
    wrapper = (
        "import resource, subprocess, sys; rc = subprocess.call(sys.argv[1:]); "
        "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
    )
    cmd = [sys.executable, "-c", wrapper, *train_command(run_dir, overrides)]
    proc = check_ok(run_command(cmd, env=offline_env(), timeout=300))
    return int(proc.stdout.rsplit("PEAK_RSS_KIB", 1)[1].split()[0]) / 1024


@pytest.mark.slow
def test_a_600mb_token_file_is_memory_mapped(prepared_fixture: Path, tmp_path: Path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:  # 300M uint16 tokens (sparse: zeros, i.e. EOS: takes no disk space)
        f.truncate(600 * 1024 * 1024)
    common = tiny("trainer.max_steps=5", "trainer.eval_every=5", "trainer.checkpoint_every=0")
    fixture = _peak_rss_mib(tmp_path / "fixture", *common)
    tokens = _peak_rss_mib(
        tmp_path / "tokens",
        *common,
        "data.name=tokens",
        f"data.data_files={big}",
        "data.token_dtype=uint16",
        f"data.tokenizer={prepared_fixture}",
    )
    print(f"peak RSS: fixture {fixture:.0f} MiB, 600 MB token file {tokens:.0f} MiB")
    assert tokens - fixture < 200, (tokens, fixture)
    assert np.memmap(big, dtype=np.uint16, mode="r").shape == (300 * 1024 * 1024,)
