"""Weighted mixtures (data.name=mixture): shares, determinism, exact resume, world-size invariance,
repeat / stop at a source's end, and one-line errors for bad sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moetrain.config import ConfigError, DataConfig
from moetrain.data import build_data, build_loaders
from moetrain.data.errors import DataError
from moetrain.data.mixture import MixtureLoader, blend_schedule


class Blocks:
    """n blocks of seq_len + 1 tokens; block i is filled with ``base + i`` (so a row names its block)."""

    def __init__(self, n: int, base: int, seq_len: int = 4) -> None:
        self.n, self.base, self.seq_len = n, base, seq_len

    def __len__(self) -> int:
        return self.n

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = (self.base + indices).long()[:, None].expand(-1, self.seq_len + 1).clone()
        return rows, torch.zeros(len(indices), dtype=torch.long)


SOURCES = [Blocks(500, 0), Blocks(300, 1000), Blocks(40, 2000)]
WEIGHTS = [0.6, 0.3, 0.1]
DOMAINS = ["web", "code", "books"]


def loader(batch_size: int = 4, rank: int = 0, world_size: int = 1, seed: int = 0, **kw) -> MixtureLoader:
    sources = kw.pop("sources", SOURCES)
    return MixtureLoader(sources, kw.pop("weights", WEIGHTS), DOMAINS, batch_size, rank, world_size, seed)


def ids(batch) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def test_shares_follow_the_weights_at_every_step():
    """The schedule keeps every source within one block of its target share after every block."""
    drawn = [0, 0, 0]
    for g in range(1, 2001):
        blend_schedule(torch.tensor(WEIGHTS, dtype=torch.float64).numpy(), drawn, g - 1, 1)
        assert all(abs(d - w * g) < 1.0 for d, w in zip(drawn, WEIGHTS)), (g, drawn)
    mix = loader()
    for _ in range(40):
        batch = next(mix)
        assert all(0 <= int(x) // 1000 == int(d) for x, d in zip(ids(batch), batch["domain"]))
    tokens = mix.tokens_by_domain()
    total = sum(tokens.values())
    assert total == 40 * 4 * 4
    for d, w in zip(DOMAINS, WEIGHTS):
        assert abs(tokens[d] / total - w) <= 1 / 160  # within one block of 160


def test_deterministic_by_seed_and_each_epoch_visits_every_block_once():
    a, b, c = loader(seed=1), loader(seed=1), loader(seed=2)
    first = [ids(next(a)) for _ in range(30)]
    assert first == [ids(next(b)) for _ in range(30)]
    assert first != [ids(next(c)) for _ in range(30)]
    # 'books' (40 blocks at 0.1) is read to its end after ~400 blocks: epoch 1 repeats it
    mix = loader(seed=3)
    seen: list[int] = []
    while mix.epochs()["books"] < 2:
        seen += [x for x in ids(next(mix)) if x >= 2000]
    first_epoch, second_epoch = seen[:40], seen[40:80]
    assert sorted(first_epoch) == sorted(second_epoch) == list(range(2000, 2040))
    assert first_epoch != second_epoch  # a new order per epoch


def test_resume_mid_mixture_is_exact_through_json():
    straight = loader(seed=5)
    expected = [ids(next(straight)) for _ in range(120)][70:]
    first = loader(seed=5)
    for _ in range(70):
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # plain ints / lists / strings
    resumed = loader(seed=5)
    resumed.load_state_dict(state)
    assert [ids(next(resumed)) for _ in range(50)] == expected


@pytest.mark.parametrize("world_size", [2, 4])
def test_the_same_blocks_at_any_world_size(world_size: int):
    one = loader(batch_size=8, seed=7)
    ranks = [
        loader(batch_size=8 // world_size, rank=r, world_size=world_size, seed=7) for r in range(world_size)
    ]
    for _ in range(60):
        whole = ids(next(one))
        parts = [ids(next(r)) for r in ranks]
        assert sorted(sum(parts, [])) == sorted(whole)
        assert parts[0] == whole[0::world_size]
    # a checkpoint taken with world_size ranks resumes on one rank exactly
    single = loader(batch_size=8, seed=7)
    single.load_state_dict(json.loads(json.dumps(ranks[1].state_dict())))
    assert ids(next(single)) == ids(next(one))


def test_exhaustion_is_announced_before_it_happens():
    mix = loader(batch_size=4)
    steps = 0
    while mix.exhausted_within(1) is None:
        next(mix)
        steps += 1
    assert mix.exhausted_within(1) == "source 'books'"
    assert mix.drawn[2] <= 40 and mix.epochs()["books"] in (0, 1)
    assert 390 <= steps * 4 <= 410  # 40 blocks at 10%: about 400 blocks in all


def test_resume_with_other_sources_is_refused():
    state = loader().state_dict()
    other = MixtureLoader(SOURCES[:2], WEIGHTS[:2], DOMAINS[:2], 4)
    with pytest.raises(DataError, match="same data.sources"):
        other.load_state_dict(state)


# ---- config and build ---------------------------------------------------------------------------
def _jsonl(path: Path, domain: str, n: int = 40) -> str:
    words = {"a": "alpha beta gamma", "b": "delta epsilon zeta", "c": "kappa lambda omicron"}[domain]
    path.write_text("".join(json.dumps({"text": f"{words} {i} " * 8}) + "\n" for i in range(n)))
    return str(path)


def mixture_config(tmp_path: Path, **overrides) -> DataConfig:
    sources = [
        {"name": "json", "data_files": _jsonl(tmp_path / f"{d}.jsonl", d), "weight": w, "domain": d}
        for d, w in (("a", 0.6), ("b", 0.3), ("c", 0.1))
    ]
    values = dict(
        name="mixture", sources=sources, seq_len=16, vocab_size=300, data_dir=str(tmp_path / "cache")
    )
    values.update(overrides)
    return DataConfig(**values)


def test_build_a_mixture_of_local_files(tmp_path: Path):
    cfg = mixture_config(tmp_path, validation_fraction=0.1)
    bundle = build_data(cfg, main_process=False)
    assert bundle.is_mixture and bundle.domains == ["a", "b", "c"]
    assert bundle.weights == pytest.approx([0.6, 0.3, 0.1])
    train, val = build_loaders(bundle, cfg, 4, eval_batches=1)
    assert list(val) == ["a", "b", "c"]
    batch = next(train)
    assert batch["input_ids"].shape == (4, 16) and "document_ids" not in batch
    # every block of a source decodes to that source's words only
    for loader_ in val.values():
        for b in loader_:
            text = bundle.tokenizer.decode(b["input_ids"][0])
            assert len({w for w in ("alpha", "delta", "kappa") if w in text}) == 1
    cfg.document_masking = True
    train, _ = build_loaders(bundle, cfg, 4)
    assert next(train)["document_ids"].shape == (4, 16)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s[0].update(weight=-1), r"data.sources\[0\].weight=-1(.0)? is invalid"),
        (lambda s: s[1].pop("weight"), r"data.sources\[1\].weight is missing"),
        (lambda s: s[2].update(domain="a"), "domain 'a' is used by more than one source"),
        (lambda s: s[0].update(seq_len=8), r"data.sources\[0\].seq_len is invalid: every source shares"),
        (lambda s: s[1].update(name="jsonl"), r"data.sources\[1\].name='jsonl' .* did you mean"),
        (lambda s: s[0].update(colour="red"), r"data.sources\[0\].colour is not a known option"),
        (lambda s: s.append("web.jsonl"), r"data.sources\[3\] must be a mapping"),
    ],
)
def test_bad_sources_fail_in_one_line(tmp_path: Path, change, message: str):
    cfg = mixture_config(tmp_path)
    change(cfg.sources)
    with pytest.raises(ConfigError, match=message) as e:
        cfg.validate()
    assert "\n" not in str(e.value)


def test_other_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="needs data.sources"):
        DataConfig(name="mixture").validate()
    with pytest.raises(ConfigError, match="use data.name=mixture"):
        DataConfig(name="fixture", sources=[{"name": "fixture", "weight": 1}]).validate()
    with pytest.raises(ConfigError, match="data.on_exhausted='loop' is invalid"):
        DataConfig(on_exhausted="loop").validate()
    with pytest.raises(ConfigError, match="data.name=tokens needs data.data_files"):
        DataConfig(name="tokens").validate()
    cfg = mixture_config(tmp_path)
    cfg.sources[2]["data_files"] = str(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match="data.sources\[2\] \(c\): data file not found: .*missing.jsonl"):
        build_data(cfg, main_process=False)
