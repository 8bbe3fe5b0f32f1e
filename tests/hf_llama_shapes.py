"""The tensor names and [out, in] shapes of a Hugging Face Llama checkpoint, written out here by
hand (not taken from models/hf_keys.py, whose mapping the tests check)."""


def hf_llama_shapes(cfg) -> dict[str, tuple[int, ...]]:
    D, F, H, K, hd = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    out = {"model.embed_tokens.weight": (cfg.vocab_size, D), "model.norm.weight": (D,),
           "lm_head.weight": (cfg.vocab_size, D)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                    p + "self_attn.q_proj.weight": (H * hd, D), p + "self_attn.k_proj.weight": (K * hd, D),
                    p + "self_attn.v_proj.weight": (K * hd, D), p + "self_attn.o_proj.weight": (D, H * hd),
                    p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                    p + "mlp.down_proj.weight": (D, F)})
    return out
