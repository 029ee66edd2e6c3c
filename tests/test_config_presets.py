"""The YAML presets hold only what differs from the dataclass defaults (Hydra's `base` nodes, registered
by ``import moetrain``); every recipe must still compose to the config it composed to when the presets
restated every default (tests/composed_configs.json, recorded before that change)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from moetrain import CONFIG_DIR
from moetrain.config import CONFIG_GROUPS, train_config_from_dict

SNAPSHOT = json.loads((Path(__file__).parent / "composed_configs.json").read_text())


def _compose(key: str) -> dict[str, Any]:
    root, *overrides = key.split(" ")
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = OmegaConf.to_container(compose(root, overrides=overrides), resolve=True)
    cfg.pop("hydra", None)
    return cfg


def _differences(recorded: Any, now: Any, where: str = "") -> list[str]:
    """Keys of the recording whose value changed or vanished (options added since are not differences)."""
    if isinstance(recorded, dict):
        if not isinstance(now, dict):
            return [f"{where}: {recorded!r} -> {now!r}"]
        out = []
        for k, v in recorded.items():
            out += _differences(v, now[k], f"{where}.{k}") if k in now else [f"{where}.{k}: missing"]
        return out
    return [] if recorded == now else [f"{where}: {recorded!r} -> {now!r}"]


@pytest.mark.parametrize("key", sorted(SNAPSHOT))
def test_every_recipe_composes_as_recorded(key: str) -> None:
    assert _differences(SNAPSHOT[key], _compose(key)) == []


def test_the_comparison_catches_a_changed_default() -> None:
    """Negative control: a changed value and a dropped key are both reported."""
    recorded = SNAPSHOT["train +experiment=mixtral_small"]
    changed = json.loads(json.dumps(recorded))
    changed["model"]["max_seq_len"] = 512
    del changed["trainer"]["keep_last"]
    assert sorted(_differences(recorded, changed)) == [
        ".model.max_seq_len: 256 -> 512",
        ".trainer.keep_last: missing",
    ]


@pytest.mark.parametrize("group", sorted(CONFIG_GROUPS))
def test_every_dataclass_field_can_be_overridden(group: str) -> None:
    """Each option exists in the composed config (from the base node), so `group.key=value` works
    on the command line without a `+`."""
    import dataclasses

    cfg = _compose("train")
    fields = {f.name for f in dataclasses.fields(CONFIG_GROUPS[group])}
    assert fields <= set(cfg[group]), fields - set(cfg[group])
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        composed = compose("train", overrides=["model.rope_theta=5000.0", "trainer.skip_window=7"])
    built = train_config_from_dict(OmegaConf.to_container(composed, resolve=True))
    assert (built.model.rope_theta, built.trainer.skip_window) == (5000.0, 7)
