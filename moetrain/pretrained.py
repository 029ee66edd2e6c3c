"""Start training from a transformers model: ``model.init_from`` (continue it as it is) and
``model.upcycle_from`` (sparse upcycling of a dense model, Komatsuzaki et al., arXiv 2212.05055).

Three steps, each in its own function:

1. ``resolve_pretrained(cfg, overrides)`` (at config time, before any data, model or engine work):
   find the folder (or download a hub id with ``huggingface_hub.snapshot_download``), take the model's
   shape and architecture from its ``config.json`` (``moetrain.hf.from_hf_config``), reject Hydra
   overrides of those keys that contradict it, keep our training options (aux loss weight, capacity
   factor, z-loss, backend ...), use the folder's tokenizer when it has one, and check the weight files
   name by name against the model from their headers alone (``check_weights``).
2. ``load_pretrained(model, ...)`` after the trainer built its (possibly expert-sharded) model: reads
   tensor by tensor with ``safe_open``; experts only in this rank's range (per-expert tensors outside
   it are never read; fused ones through ``get_slice``), so host memory stays near the shard.
3. Upcycling: every expert starts as a copy of the dense FFN (optionally with noise), the router
   keeps its fresh init. With renormalised top-k the weights of the chosen copies sum to 1, so the
   MoE computes the dense model's function at step 0.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from moetrain.config import ConfigError, ModelConfig, MoEConfig, TrainConfig, arch_fields

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")

# What the checkpoint decides (its function); everything else under model.* stays ours (training).
ARCH_KEYS = arch_fields(ModelConfig)  # the fields marked ARCH in moetrain/config/model.py
ARCH_MOE_KEYS = arch_fields(MoEConfig)
# Upcycling chooses the MoE here: these come from our config, not the dense checkpoint.
UPCYCLE_OURS = ("num_experts", "top_k", "moe_every", "mlp_only_layers")


def _is_hub_id(s: str) -> bool:
    parts = s.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "~")) and not os.path.exists(s)


def resolve_source(source: str, key: str = "model.init_from") -> Path:
    """A local transformers folder, or a hub id downloaded (config, safetensors, tokenizer) to the
    Hugging Face cache. One-line ``ConfigError`` when it is neither."""
    p = Path(source).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ConfigError(f"{key}={source!r} has no config.json: expected a transformers model folder")
        return p
    if not _is_hub_id(source):
        raise ConfigError(f"{key}={source!r} is not a folder (nor a hub id such as owner/name)")
    try:  # pragma: no cover - needs the network; never run in tests
        from huggingface_hub import snapshot_download

        path = snapshot_download(
            source,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"],
        )
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated model: one line for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(
            f"{key}={source!r} is not a local folder, and downloading it as a hub id failed ({first})"
        ) from None
    return Path(path)


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a transformers folder: one file, or the shards its index lists."""
    index = folder / WEIGHTS_INDEX
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    if (folder / WEIGHTS_FILE).is_file():
        return [folder / WEIGHTS_FILE]
    raise ConfigError(f"{folder} has no {WEIGHTS_FILE} nor {WEIGHTS_INDEX} (only safetensors weights load)")


def has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def _override_values(overrides: list[str]) -> dict[str, Any]:
    """``model.x=v`` Hydra overrides of the command line, parsed as Hydra does for plain values."""
    out = {}
    for item in overrides:
        key, sep, value = item.lstrip("+~").partition("=")
        if sep and key.startswith("model."):
            try:
                out[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                out[key] = value
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return sorted(a) == sorted(b)
    return a == b


def source_model_config(source: Path, key: str) -> ModelConfig:
    """Our ModelConfig for the folder's config.json (``moetrain.hf.from_hf_config``), or one line why not."""
    from transformers import AutoConfig

    from moetrain.hf import from_hf_config

    try:
        return from_hf_config(
            AutoConfig.from_pretrained(str(source), local_files_only=True, trust_remote_code=False)
        )
    except (ValueError, OSError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{key}={str(source)!r}: {first}") from None


def resolve_pretrained(cfg: TrainConfig, overrides: list[str] | None = None) -> list[str]:
    """Fill ``cfg.model`` (in place) from ``model.init_from`` / ``model.upcycle_from``; return notes
    for the user. A no-op without either. One-line ``ConfigError`` on any contradiction or mismatch."""
    m = cfg.model
    if not (m.init_from or m.upcycle_from):
        return []
    upcycle = bool(m.upcycle_from)
    key = "model.upcycle_from" if upcycle else "model.init_from"
    folder = resolve_source(m.upcycle_from or m.init_from, key)
    src = source_model_config(folder, key)
    if upcycle and src.num_experts:
        raise ConfigError(
            f"{key}={str(folder)!r} is already an MoE ({src.num_experts} experts): continue it with model.init_from"
        )
    if upcycle and m.num_experts < 1:
        raise ConfigError(f"model.num_experts={m.num_experts} is invalid: {key} needs >= 1 experts per layer")
    given = _override_values(overrides or [])
    keep = UPCYCLE_OURS if upcycle else ()
    for k in ARCH_KEYS:
        if k in keep:
            continue
        if f"model.{k}" in given and not _same(given[f"model.{k}"], getattr(src, k)):
            raise ConfigError(
                f"model.{k}={given[f'model.{k}']!r} contradicts {key}: its config has {k}={getattr(src, k)!r} "
                f"(the model's shape comes from the checkpoint; drop the override)"
            )
        setattr(m, k, getattr(src, k))
    for k in ARCH_MOE_KEYS:
        if upcycle and k == "normalize_top_k":
            continue  # ours: renormalised top-k keeps the dense function at step 0
        if upcycle and k in (
            "n_group",
            "topk_group",
            "routed_scaling_factor",
            "selection_bias",
            "router_bias",
        ):
            continue  # the new router is ours to choose
        if f"model.moe.{k}" in given and not _same(given[f"model.moe.{k}"], getattr(src.moe, k)):
            raise ConfigError(
                f"model.moe.{k}={given[f'model.moe.{k}']!r} contradicts {key}: its config has "
                f"{k}={getattr(src.moe, k)!r} (drop the override)"
            )
        setattr(m.moe, k, getattr(src.moe, k))
    notes = []
    if upcycle:
        m.ffn_hidden_size = src.dense_ffn_size  # every expert is a copy of the dense FFN
        m.dense_ffn_hidden_size = src.dense_ffn_size
        if not m.moe.normalize_top_k:
            notes.append(
                "note: model.moe.normalize_top_k=false: the upcycled model does not start as the dense "
                "model's function (the chosen copies' weights do not sum to 1)"
            )
    m.name = str(m.upcycle_from or m.init_from)
    if m.upcycle_from:
        m.upcycle_from = str(folder)
    else:
        m.init_from = str(folder)
    if cfg.data.tokenizer is None and has_tokenizer(folder):
        cfg.data.tokenizer = str(folder)
        notes.append(f"tokenizer: {folder}")
    elif cfg.data.tokenizer is None:
        notes.append(
            f"note: {folder} has no tokenizer: training with moetrain's builtin BPE (data.vocab_size="
            f"{cfg.data.vocab_size}); the pretrained embeddings then mean other tokens (set data.tokenizer to "
            "the model's tokenizer)"
        )
        if cfg.data.vocab_size > m.vocab_size:
            raise ConfigError(
                f"data.vocab_size={cfg.data.vocab_size} is larger than the checkpoint's vocab_size={m.vocab_size}: "
                "set data.tokenizer to the model's tokenizer or a smaller data.vocab_size"
            )
    cfg.validate()
    check_weights(m, folder, upcycle)
    return notes


# ---- name-by-name check and loading ---------------------------------------------------------------
def _expected_shapes(model_cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of the model built from ``model_cfg`` with its full (unsharded) shape; the
    build happens on the meta device, so it costs nothing."""
    from moetrain.model import MoETransformer

    with torch.device("meta"):
        model = MoETransformer(model_cfg)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    # persistent buffers that checkpoints hold too (the expert-selection bias)
    shapes.update({n: tuple(b.shape) for n, b in model.named_buffers() if n.endswith(".router.expert_bias")})
    if model_cfg.tie_embeddings:
        shapes.pop("lm_head.weight", None)  # the embedding; files of tied models omit it
    return shapes


def _upcycle_target(ours: str) -> str | None:
    """The expert tensor a dense FFN weight becomes: ffn.w1.weight -> ffn.experts.w1, w3 -> v1, w2 -> w2."""
    for dense, expert in ((".ffn.w1.weight", ".ffn.experts.w1"), (".ffn.w3.weight", ".ffn.experts.v1")):
        if ours.endswith(dense):
            return ours.removesuffix(dense) + expert
    if ours.endswith(".ffn.w2.weight"):
        return ours.removesuffix(".ffn.w2.weight") + ".ffn.experts.w2"
    return None


def _entries(folder: Path):
    """(file, transformers name, shape) for every tensor in the folder's weight files (headers only)."""
    from safetensors import safe_open

    for path in weight_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                yield path, name, tuple(f.get_slice(name).get_shape())


def _mtp_layer(name: str, folder: Path, num_layers: int) -> bool:
    """Whether ``name`` belongs to a multi-token-prediction module (DeepSeek-V3, GLM-4.5 store them as
    layers num_layers.. of their config's num_nextn_predict_layers); they are not loaded, as in transformers."""
    m = re.match(r"^model\.layers\.(\d+)\.", name)
    if m is None or int(m.group(1)) < num_layers:
        return False
    config = json.loads((folder / "config.json").read_text())
    return int(m.group(1)) < num_layers + int(config.get("num_nextn_predict_layers") or 0)


def check_weights(model_cfg: ModelConfig, folder: Path, upcycle: bool = False) -> None:
    """Every tensor of the model is in the files with the right shape, and nothing else is there:
    one-line ``ConfigError`` naming the first tensor that is missing, unexpected or of the wrong
    shape. Reads the safetensors headers only."""
    from moetrain.hf import gpt_oss, hf_key_spec

    expected = _expected_shapes(model_cfg)
    E = model_cfg.num_experts
    moe_layers = set(model_cfg.moe_layer_ids)
    seen: set[str] = set()
    seen_experts: dict[str, set[int]] = {}
    for path, name, shape in _entries(folder):
        if _mtp_layer(name, folder, model_cfg.num_layers):
            continue
        where = f"{path.name}: {name}"
        spec = hf_key_spec(name, model_cfg)
        if spec is None:
            raise ConfigError(f"{where} is unexpected: no tensor of this model corresponds to it")
        ours, want = spec.ours, None
        if upcycle:
            target = _upcycle_target(ours)
            layer = int(ours.split(".")[1]) if ours.startswith("layers.") else -1
            if target is not None and layer in moe_layers:
                F, H = model_cfg.ffn_hidden_size, model_cfg.hidden_size
                want = (H, F) if target.endswith("w2") else (F, H)
                if shape != want:
                    raise ConfigError(f"{where} has shape {list(shape)}, expected {list(want)} (dense FFN)")
                seen_experts.setdefault(target, set()).update(range(E))
                continue
        if ours not in expected and not (ours == "lm_head.weight" and model_cfg.tie_embeddings):
            raise ConfigError(f"{where} is unexpected: this model has no {ours}")
        full = expected.get(ours, expected.get("embed.weight"))
        if spec.part == "copy":
            want = full
            seen.add(ours)
        elif spec.part == "gate_up":
            want = (full[0], 2 * full[1], full[2])
            for part in (ours, ours.replace(".w1", ".v1")):
                seen_experts.setdefault(part, set()).update(range(E))
        elif spec.part == "down":
            want = (full[0], full[2], full[1])
            seen_experts.setdefault(ours, set()).update(range(E))
        elif spec.part in gpt_oss.PARTS:
            want = gpt_oss.file_shape(spec.part, name, full)
            for part in gpt_oss.filled(spec.part, ours):
                seen.add(part)
                seen_experts.setdefault(part, set()).update(range(E))
        else:
            if not 0 <= spec.expert < full[0]:
                raise ConfigError(f"{where} is unexpected: the model has {full[0]} experts per layer")
            want = (full[2], full[1]) if spec.transpose else full[1:]
            seen_experts.setdefault(ours, set()).add(spec.expert)
        if tuple(shape) != tuple(want):
            raise ConfigError(f"{where} has shape {list(shape)}, expected {list(want)} (for {ours})")
    for ours, shape in expected.items():
        if ours.endswith((".experts.w1", ".experts.v1", ".experts.w2")):
            missing = sorted(set(range(shape[0])) - seen_experts.get(ours, set()))
            if missing:
                raise ConfigError(f"{folder}: {ours} (expert {missing[0]}) is missing from the weight files")
        elif ours not in seen and not (upcycle and ours.endswith(".router.gate.weight")):
            raise ConfigError(f"{folder}: {ours} is missing from the weight files")


def _local_range(param: torch.Tensor, layer: Any) -> tuple[int, int]:
    first = getattr(layer.experts, "first_expert", 0)
    return first, first + param.shape[0]


@torch.no_grad()
def load_pretrained(
    model: Any, folder: str | os.PathLike, *, upcycle: bool = False, noise: float = 0.0
) -> None:
    """Copy a transformers folder's weights into ``model`` (our names; ``check_weights`` passed).

    Under expert parallelism ``model`` holds experts ``[first_expert, first_expert + El)`` of each
    layer: only those are read (per-expert tensors of other ranks are skipped unread, fused
    ``[E, ...]`` tensors are sliced on disk with ``get_slice``), one tensor at a time.
    ``upcycle``: the dense FFN of each layer is copied into every local expert; ``noise`` > 0 adds
    Gaussian noise of ``noise`` x the weight's std, seeded per (layer, tensor, global expert) so that
    every layout gets the same experts."""
    from safetensors import safe_open

    from moetrain.hf import gpt_oss, hf_key_spec

    folder = Path(folder)
    from moetrain.distributed.zero3 import writable_parameters

    # a ZeRO-3 build's parameters are partitioned: each rank keeps its own elements of what it reads
    params = {**dict(model.named_buffers()), **writable_parameters(model)}
    layers = {f"layers.{i}.ffn": b.ffn for i, b in enumerate(model.layers) if b.is_moe}
    get_slice = _slice_reader(folder)
    for path in weight_files(folder):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118
                if _mtp_layer(name, folder, model.cfg.num_layers):
                    continue
                spec = hf_key_spec(name, model.cfg)
                ours = spec.ours
                if spec.part in gpt_oss.PARTS:  # gpt-oss layouts and MXFP4: this rank's experts only
                    lo, hi = _local_range(params[ours], layers[ours.rsplit(".experts.", 1)[0]])
                    for target, t in gpt_oss.read_experts(spec.part, name, ours, get_slice, lo, hi).items():
                        params[target].copy_(t)
                    continue
                target = _upcycle_target(ours) if upcycle else None
                if target is not None and target.rsplit(".experts.", 1)[0] in layers:
                    _fill_experts(params[target], layers[target.rsplit(".experts.", 1)[0]], f.get_tensor(name),
                                  target, noise)  # fmt: skip
                    continue
                if spec.part == "copy":
                    if ours == "lm_head.weight" and ours not in params:
                        continue  # tied to the embedding
                    params[ours].copy_(f.get_tensor(name))
                    continue
                layer = layers[ours.rsplit(".experts.", 1)[0]]
                lo, hi = _local_range(params[ours], layer)
                if spec.part == "expert":
                    if lo <= spec.expert < hi:
                        t = f.get_tensor(name)
                        params[ours][spec.expert - lo].copy_(t.t() if spec.transpose else t)
                elif spec.part == "gate_up":
                    t = f.get_slice(name)[lo:hi]  # [El, 2F, H]: only this rank's experts
                    F = t.shape[1] // 2
                    params[ours].copy_(t[:, :F])
                    params[ours.replace(".w1", ".v1")].copy_(t[:, F:])
                else:  # down: [El, H, F]
                    params[ours].copy_(f.get_slice(name)[lo:hi].transpose(1, 2))
    model.tie_weights()  # a tied head was filled through its embedding (one tensor); keep it one


def _slice_reader(folder: Path):
    """``get(name)``: the safetensors slice of a tensor of the folder, in whichever file holds it (MXFP4
    scales may sit in another shard than their blocks)."""
    from safetensors import safe_open

    index = folder / WEIGHTS_INDEX
    where = json.loads(index.read_text())["weight_map"] if index.is_file() else {}

    class _Slice:  # opened per read: no file stays open
        def __init__(self, name: str) -> None:
            self.name = name

        def __getitem__(self, index):  # noqa: ANN001, ANN204
            with safe_open(
                str(folder / where.get(self.name, WEIGHTS_FILE)), framework="pt", device="cpu"
            ) as f:
                return f.get_slice(self.name)[index]

    return _Slice


def _fill_experts(param: torch.Tensor, layer: Any, dense: torch.Tensor, name: str, noise: float) -> None:
    from moetrain.model.transformer import _seed

    w = dense.t() if name.endswith(".w2") else dense  # experts.w2 is [F, H], down_proj [H, F]
    lo, _ = _local_range(param, layer)
    for e in range(param.shape[0]):
        param[e].copy_(w)
        if noise > 0:
            g = torch.Generator().manual_seed(_seed(torch.initial_seed(), name, lo + e))
            std = float(w.float().std()) * noise
            param[e].add_(torch.randn(w.shape, generator=g).to(param.dtype) * std)


def pretrained_summary(model_cfg: ModelConfig) -> str | None:
    """One line for the run's banner, or None when the model starts from random init."""
    if model_cfg.upcycle_from:
        noise = f", expert noise {model_cfg.upcycle_noise:g}" if model_cfg.upcycle_noise else ""
        return (
            f"upcycled from {model_cfg.upcycle_from}: {model_cfg.num_experts} experts (copies of the dense FFN"
            f"{noise}), top-{model_cfg.top_k}, fresh router"
        )
    if model_cfg.init_from:
        return f"weights from {model_cfg.init_from}"
    return None
