"""Reference BLIP-2 configs and helpers for tests and benchmarks, as `transformers.testing_utils` is for
transformers: tiny configs (every width 32, vocab 99) and the Salesforce/blip2-* configs at real width with their
depth cut, all as transformers-format dicts (`model_type: "blip-2"`, what a Salesforce config.json holds), so that
both transformers' classes and ours can be built from them."""

from __future__ import annotations

import copy

import torch

IMAGE_TOKEN = 90  # the `<image>` id of the tiny vocabularies below (vocab 99)

TINY_VISION = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=30, patch_size=6
)
TINY_QFORMER = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    cross_attention_frequency=2,
)
TINY_TEXT = {
    "opt": dict(
        model_type="opt",
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        ffn_dim=37,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=128,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
    ),
    "t5": dict(
        model_type="t5",
        vocab_size=99,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        dense_act_fn="gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,  # what transformers' Flan-T5 conversion writes (T5 has no BOS; 1 is `</s>`)
        decoder_start_token_id=0,
    ),
    "llama": dict(
        model_type="llama",
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    ),
}
TINY_TEXT["qwen2"] = dict(TINY_TEXT["llama"], model_type="qwen2")  # the same shapes, Qwen2's code


def tiny_config_dict(text: str = "opt", num_query_tokens: int = 4, text_input: bool = False, **overrides) -> dict:
    """A transformers-format BLIP-2 config dict (`model_type` "blip-2", as the Salesforce files) at a tiny size."""
    config = dict(
        model_type="blip-2",
        vision_config=dict(TINY_VISION),
        qformer_config=dict(TINY_QFORMER, use_qformer_text_input=text_input),
        text_config=dict(TINY_TEXT[text]),
        num_query_tokens=num_query_tokens,
        image_token_index=IMAGE_TOKEN,
    )
    config.update(overrides)
    return copy.deepcopy(config)


def salesforce_config_dict(name: str, depth: int = 1) -> dict:
    """The Salesforce/blip2-opt-2.7b and blip2-flan-t5-xl configs (real widths and vocabularies) with every stack cut
    to `depth` layers. Values from the published config.json files (opt-2.7b: vocab 50304, `<image>` 50265, eos "\\n"
    50118; flan-t5-xl: vocab 32128, `<image>` 32100, gelu, bos 1)."""
    vision = dict(
        hidden_size=1408,
        intermediate_size=6144,
        num_hidden_layers=depth,
        num_attention_heads=16,
        image_size=224,
        patch_size=14,
    )
    qformer = dict(num_hidden_layers=max(depth, 2), cross_attention_frequency=2)
    if name == "blip2-opt-2.7b":
        text = dict(
            model_type="opt",
            vocab_size=50304,
            hidden_size=2560,
            ffn_dim=10240,
            num_attention_heads=32,
            num_hidden_layers=depth,
            word_embed_proj_dim=2560,
            max_position_embeddings=2048,
            do_layer_norm_before=True,
            prefix="</s>",
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=50118,
        )
        image_token_index = 50265
    elif name == "blip2-flan-t5-xl":
        text = dict(
            model_type="t5",
            vocab_size=32128,
            d_model=2048,
            d_kv=64,
            d_ff=5120,
            num_heads=32,
            num_layers=depth,
            num_decoder_layers=depth,
            feed_forward_proj="gated-gelu",
            dense_act_fn="gelu",
            is_gated_act=True,
            layer_norm_epsilon=1e-6,
            relative_attention_num_buckets=32,
            relative_attention_max_distance=128,
            tie_word_embeddings=False,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=1,
            decoder_start_token_id=0,
        )
        image_token_index = 32100
    else:
        raise ValueError(name)
    return dict(
        model_type="blip-2",
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=32,
        image_token_index=image_token_index,
    )


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.02) -> torch.nn.Module:
    """Move every weight off its init (zero query tokens, unit LayerNorms, ...), so that a parameter loaded into the
    wrong place cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * scale)
    return model.eval()
