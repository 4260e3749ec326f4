"""Rotary position embeddings in low precision: float32 arithmetic with a single rounding to the input dtype."""

import pytest
import torch

from mdlm.modeling_mdlm import MdlmRotaryEmbedding, apply_rotary

from conftest import tiny_config


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rope_percent", [1.0, 0.5])
def test_low_precision_rotary_rounds_float32_result(dtype, rope_percent):
    config = tiny_config(hidden_size=128, num_attention_heads=2, max_position_embeddings=512, rope_percent=rope_percent)
    cos, sin = MdlmRotaryEmbedding(config)(None, 512, torch.device("cpu"))
    x = torch.randn(2, 2, 512, config.head_dim, generator=torch.Generator().manual_seed(0)).to(dtype)
    rotated = apply_rotary(x, cos, sin)
    assert rotated.dtype == dtype
    expected = apply_rotary(x.float(), cos, sin).to(dtype)
    torch.testing.assert_close(rotated, expected, rtol=0, atol=0)


def test_rotary_matches_rotation_formula():
    config = tiny_config(hidden_size=64, num_attention_heads=2)
    cos, sin = MdlmRotaryEmbedding(config)(None, 7, torch.device("cpu"))
    x = torch.randn(1, 2, 7, 32, generator=torch.Generator().manual_seed(1))
    first, second = x.chunk(2, dim=-1)
    expected = torch.cat((first, second), dim=-1) * cos + torch.cat((-second, first), dim=-1) * sin
    torch.testing.assert_close(apply_rotary(x, cos, sin), expected)
