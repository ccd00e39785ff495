"""Configs of the small CLIP and T5 text encoders that pair with the `tiny` presets (demo and tests)."""

from __future__ import annotations

from kontext_rt.config import PRESETS


def clip_config(vocab_size: int, eos_id: int, bos_id: int):
    from transformers import CLIPTextConfig

    cfg = PRESETS["tiny"]
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.vec_in_dim,
        intermediate_size=2 * cfg.vec_in_dim,
        projection_dim=cfg.vec_in_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        eos_token_id=eos_id,
        bos_token_id=bos_id,
        pad_token_id=eos_id,
    )


def t5_config(vocab_size: int):
    from transformers import T5Config

    cfg = PRESETS["tiny"]
    return T5Config(
        vocab_size=vocab_size,
        d_model=cfg.context_in_dim,
        d_ff=2 * cfg.context_in_dim,
        d_kv=12,
        num_heads=4,
        num_layers=2,
        feed_forward_proj="gated-gelu",
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
