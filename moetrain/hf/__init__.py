"""moetrain <-> transformers: configs and weights of five families, both directions.

    family (model_type)      transformers class       what it adds to the Mixtral-style decoder
    mixtral                  MixtralForCausalLM       -
    mistral, llama (dense)   MistralForCausalLM       (no experts; Llama exports as Mistral: same function)
    qwen3 (dense)            Qwen3ForCausalLM         per-head QK-norm
    olmoe                    OlmoeForCausalLM         QK-norm over the whole q / k projection, top-k not renormalised
    qwen2_moe                Qwen2MoeForCausalLM      q/k/v bias, shared expert with a sigmoid gate, sparse-layer choice
    qwen3_moe                Qwen3MoeForCausalLM      per-head QK-norm, norm_topk_prob, sparse-layer choice

Every family names its tensors the same way in memory (transformers 5.x), so one mapping serves all:

    ours (MoETransformer.state_dict())          transformers 5.x, in memory
    embed.weight                                model.embed_tokens.weight
    layers.i.attention_norm.weight              model.layers.i.input_layernorm.weight
    layers.i.attention.{q,k,v,o}_proj.weight    model.layers.i.self_attn.{q,k,v,o}_proj.weight
    layers.i.attention.{q,k,v}_proj.bias        model.layers.i.self_attn.{q,k,v}_proj.bias      (Qwen2-MoE)
    layers.i.attention.{q,k}_norm.weight        model.layers.i.self_attn.{q,k}_norm.weight      (OLMoE, Qwen3)
    layers.i.ffn_norm.weight                    model.layers.i.post_attention_layernorm.weight
    layers.i.ffn.router.gate.weight   [E, H]    model.layers.i.mlp.gate.weight        [E, H]
    layers.i.ffn.experts.w1, .v1      [E, F, H] model.layers.i.mlp.experts.gate_up_proj [E, 2F, H]
                                                  (= cat(w1, v1) along F: gate rows, then up rows)
    layers.i.ffn.experts.w2           [E, F, H] model.layers.i.mlp.experts.down_proj  [E, H, F] (= w2^T)
    layers.i.ffn.shared_expert.{w1,w3,w2}       model.layers.i.mlp.shared_expert.{gate,up,down}_proj (Qwen2-MoE)
    layers.i.ffn.shared_expert_gate.weight      model.layers.i.mlp.shared_expert_gate.weight
    layers.i.ffn.w1 / w3 / w2 (dense)           model.layers.i.mlp.gate_proj / up_proj / down_proj
    norm.weight                                 model.norm.weight
    lm_head.weight                              lm_head.weight

On disk (``save_pretrained``, downloaded checkpoints) experts are stored one by one:
``block_sparse_moe.experts.{e}.w1/w3/w2`` (Mixtral) or ``mlp.experts.{e}.gate_proj/up_proj/down_proj``
(the others). ``hf_key_spec`` maps any of these names to ours (used to read only some experts, see
moetrain/pretrained.py); ``from_hf_state_dict`` converts a whole state dict.

Which class a model exports to follows from its options (``hf_architecture``); what no class can
express is refused with a one-line ``ValueError``: dense layers between Mixtral/OLMoE MoE layers,
un-renormalised top-k in Mixtral, sigmoid router scores, the aux-loss-free expert-selection bias
(``moetrain.export --drop-expert-bias`` exports without it, with a warning). On import: activations
other than SiLU, RoPE scalings other than linear / dynamic / llama3 / yarn (model/rope.py), and family options we do not implement (OLMoE's clip_qkv,
Qwen's per-layer sliding windows, biases on the output projection).
"""

from moetrain.hf.config import (
    DENSE_FAMILIES,
    MOE_FAMILIES,
    from_hf_config,
    hf_architecture,
    to_hf_config,
    to_mistral_config,
    to_mixtral_config,
)
from moetrain.hf.state import (
    KeySpec,
    from_hf_state_dict,
    from_mixtral_state_dict,
    hf_key_spec,
    hf_model_from_state,
    to_hf_model,
    to_hf_state_dict,
    to_mixtral_state_dict,
)

__all__ = [
    "DENSE_FAMILIES",
    "MOE_FAMILIES",
    "KeySpec",
    "from_hf_config",
    "from_hf_state_dict",
    "from_mixtral_state_dict",
    "hf_architecture",
    "hf_key_spec",
    "hf_model_from_state",
    "to_hf_config",
    "to_hf_model",
    "to_hf_state_dict",
    "to_mistral_config",
    "to_mixtral_config",
    "to_mixtral_state_dict",
]
