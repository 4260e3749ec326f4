"""Architecture, configuration, save/reload and remote-code loading of MdlmForMaskedDiffusion."""

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from mdlm import MdlmConfig, MdlmForMaskedDiffusion
from mdlm.modeling_mdlm import MdlmBlock, MdlmMLP, MdlmRotaryEmbedding, apply_rotary

from conftest import MASK_ID, VOCAB_SIZE, random_tokens, tiny_config, tiny_model


def test_no_bias_parameters():
    model = tiny_model()
    names = [name for name, _ in model.named_parameters() if "bias" in name]
    assert names == []
    for module in model.modules():
        if isinstance(module, nn.Linear):
            assert module.bias is None


def test_every_block_has_rmsnorm_and_swiglu():
    model = tiny_model(num_hidden_layers=3)
    blocks = [m for m in model.modules() if isinstance(m, MdlmBlock)]
    assert len(blocks) == 3
    for block in blocks:
        assert isinstance(block.attention_norm, nn.RMSNorm)
        assert isinstance(block.mlp_norm, nn.RMSNorm)
        assert isinstance(block.mlp, MdlmMLP)
    assert isinstance(model.model.norm, nn.RMSNorm)
    assert not any(isinstance(m, nn.LayerNorm) for m in model.modules())


def test_swiglu_computes_down_of_silu_gate_times_up():
    config = tiny_config()
    mlp = MdlmMLP(config)
    x = torch.randn(2, 5, config.hidden_size)
    gate_weight, up_weight = mlp.gate_up_proj.weight.chunk(2, dim=0)
    expected = (torch.nn.functional.silu(x @ gate_weight.T) * (x @ up_weight.T)) @ mlp.down_proj.weight.T
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize("hidden_size, expected", [(512, 1344), (768, 2048), (1024, 2688), (256, 640)])
def test_default_ffn_width_formula(hidden_size, expected, tmp_path):
    config = MdlmConfig(hidden_size=hidden_size, num_attention_heads=8)
    assert config.intermediate_size == expected
    config.save_pretrained(tmp_path)
    assert MdlmConfig.from_pretrained(tmp_path).to_dict()["intermediate_size"] == expected
    assert '"intermediate_size": %d' % expected in (tmp_path / "config.json").read_text()


def test_config_accepts_short_aliases():
    config = MdlmConfig(d_model=128, n_layers=3, n_heads=8, d_ff=256)
    assert config.hidden_size == 128
    assert config.num_hidden_layers == 3
    assert config.num_attention_heads == 8
    assert config.intermediate_size == 256
    assert config.d_model == 128


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=100, num_attention_heads=3), "num_attention_heads=3"),
        (dict(rope_percent=0.0), "rope_percent=0.0"),
        (dict(rope_percent=1.5), "rope_percent=1.5"),
        (dict(hidden_size=32, num_attention_heads=16, rope_percent=0.5), "at least 2 dimensions"),
        (dict(mask_token_id=VOCAB_SIZE), f"mask_token_id={VOCAB_SIZE}"),
        (dict(hidden_size=0), "hidden_size=0"),
        (dict(num_hidden_layers=-1), "num_hidden_layers=-1"),
    ],
)
def test_config_rejects_invalid_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_partial_rotary_leaves_tail_dimensions_unchanged():
    config = tiny_config(hidden_size=64, num_attention_heads=2, rope_percent=0.25)  # head_dim 32, rotary_dim 8
    assert config.rotary_dim == 8
    rotary = MdlmRotaryEmbedding(config)
    cos, sin = rotary(None, 6, torch.device("cpu"))
    x = torch.randn(1, 2, 1, 32).expand(1, 2, 6, 32)  # the same vector at every position
    rotated = apply_rotary(x, cos, sin)
    torch.testing.assert_close(rotated[..., 8:], x[..., 8:], rtol=0, atol=0)
    assert not torch.allclose(rotated[:, :, 3, :8], rotated[:, :, 0, :8])


def test_rotary_rotation_preserves_norm_and_relative_angle():
    config = tiny_config(hidden_size=64, num_attention_heads=2)
    rotary = MdlmRotaryEmbedding(config)
    cos, sin = rotary(None, 10, torch.device("cpu"))
    q = torch.randn(1, 1, 1, 32).expand(1, 1, 10, 32)
    k = torch.randn(1, 1, 1, 32).expand(1, 1, 10, 32)
    rq, rk = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    # The score depends only on the offset: (q at 5, k at 2) equals (q at 7, k at 4).
    torch.testing.assert_close((rq[..., 5, :] * rk[..., 2, :]).sum(), (rq[..., 7, :] * rk[..., 4, :]).sum())


@pytest.mark.parametrize("use_rope", [True, False])
def test_attention_is_bidirectional(use_rope):
    model = tiny_model(use_rope=use_rope).eval()
    tokens = random_tokens(1, 12)
    changed = tokens.clone()
    changed[0, -1] = (tokens[0, -1] + 1 - 3) % (MASK_ID - 3) + 3
    tokens[0, 0] = changed[0, 0] = MASK_ID  # position 0 is masked, so its prediction comes from the network
    before = model(tokens).logits[0, 0]
    after = model(changed).logits[0, 0]
    assert not torch.allclose(before, after)


def test_padding_is_hidden_from_attention():
    model = tiny_model().eval()
    tokens = random_tokens(1, 8)
    tokens[0, :3] = MASK_ID
    padded = torch.cat([tokens, torch.full((1, 4), 2)], dim=1)
    mask = torch.cat([torch.ones(1, 8), torch.zeros(1, 4)], dim=1).long()
    alone = model(tokens).logits
    with_padding = model(padded, attention_mask=mask).logits[:, :8]
    torch.testing.assert_close(with_padding, alone, rtol=1e-5, atol=1e-5)


def test_all_padding_row_gives_no_nan():
    model = tiny_model().eval()
    tokens = random_tokens(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1] = 0
    logits = model(tokens, attention_mask=mask).logits
    assert not torch.isnan(logits).any()


def closed_form_parameter_count(config: MdlmConfig) -> int:
    D, F, L, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    per_block = 4 * D * D + 3 * D * F + 2 * D  # qkv + output projections, SwiGLU, two RMSNorm weights
    embeddings = V * D if config.tie_word_embeddings else 2 * V * D
    positions = 0 if config.use_rope else config.max_position_embeddings * D
    return embeddings + positions + L * per_block + D


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": False}, {"use_rope": False}])
def test_parameter_count_matches_closed_form(overrides):
    model = tiny_model(**overrides)
    assert model.num_parameters() == closed_form_parameter_count(model.config)


def test_tied_embeddings_share_storage():
    model = tiny_model()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_gradient_checkpointing_gives_same_gradients():
    tokens = random_tokens(2, 10)
    labels = torch.where(torch.arange(10) % 2 == 0, tokens, -100)
    inputs = torch.where(labels != -100, MASK_ID, tokens)
    t = torch.tensor([0.3, 0.8])
    gradients = []
    for checkpointing in (False, True):
        model = tiny_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        model(inputs, labels=labels, t=t).loss.backward()
        gradients.append(model.model.layers[0].attention.qkv_proj.weight.grad.clone())
    assert model.is_gradient_checkpointing
    torch.testing.assert_close(gradients[0], gradients[1])


def test_resize_token_embeddings_grows_both_ends():
    model = tiny_model(tie_word_embeddings=False)
    model.resize_token_embeddings(VOCAB_SIZE + 8)
    assert model.get_input_embeddings().weight.shape[0] == VOCAB_SIZE + 8
    assert model.lm_head.weight.shape[0] == VOCAB_SIZE + 8
    assert model.config.vocab_size == VOCAB_SIZE + 8
    assert model(random_tokens(1, 4)).logits.shape[-1] == VOCAB_SIZE + 8


def test_reload_gives_identical_logits(tmp_path):
    model = tiny_model(rope_percent=0.5, rope_theta=500.0).eval()
    tokens = random_tokens(2, 16)
    tokens[:, ::3] = MASK_ID
    expected = model(tokens).logits
    model.save_pretrained(tmp_path)
    reloaded = MdlmForMaskedDiffusion.from_pretrained(tmp_path).eval()
    assert torch.equal(reloaded(tokens).logits, expected)


def test_saved_folder_has_code_and_auto_map(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    for name in ("configuration_mdlm.py", "modeling_mdlm.py", "noise_schedule.py", "generation_mdlm.py"):
        assert (tmp_path / name).is_file(), name
    auto_map = MdlmConfig.from_pretrained(tmp_path).auto_map
    assert auto_map["AutoConfig"] == "configuration_mdlm.MdlmConfig"
    assert auto_map["AutoModel"] == "modeling_mdlm.MdlmForMaskedDiffusion"
    assert auto_map["AutoModelForMaskedLM"] == "modeling_mdlm.MdlmForMaskedDiffusion"


def test_remote_code_loads_without_the_package(tmp_path):
    model = tiny_model(rope_percent=0.5).eval()
    tokens = random_tokens(2, 16)
    tokens[:, ::2] = MASK_ID
    checkpoint = tmp_path / "checkpoint"
    model.save_pretrained(checkpoint)
    torch.save({"tokens": tokens, "logits": model(tokens).logits}, tmp_path / "expected.pt")

    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["mdlm"] = None  # any `import mdlm` now raises ImportError
        try:
            import mdlm
            raise SystemExit("mdlm is importable, the test would prove nothing")
        except ImportError:
            pass
        import torch
        from transformers import AutoModel, AutoModelForMaskedLM
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        for auto_class in (AutoModel, AutoModelForMaskedLM):
            model = auto_class.from_pretrained({str(checkpoint)!r}, trust_remote_code=True).eval()
            assert type(model).__name__ == "MdlmForMaskedDiffusion", type(model)
            assert "transformers_modules" in type(model).__module__, type(model).__module__
            logits = model(expected["tokens"]).logits
            assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().nan_to_num().max()
        print("REMOTE-CODE-OK")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": "", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-CODE-OK" in result.stdout
