"""Attention restricted to each packed document, and positions that restart per document."""

import pytest
import torch

from mdlm.modeling_mdlm import document_attention_mask, document_ids, document_position_ids

from conftest import EOD_ID, MASK_ID, PAD_ID, random_tokens, tiny_config, tiny_model


FIRST_LENGTH = 6  # the first document's tokens, its end-of-document token included
SECOND_LENGTH = 5


def packed_block(seed: int = 0, masked: bool = True) -> torch.Tensor:
    """One row: a document of FIRST_LENGTH tokens, then one of SECOND_LENGTH, each ended by EOD_ID.

    With `masked`, one token of each document is the mask token, as in a noised training input.
    """
    tokens = random_tokens(1, FIRST_LENGTH + SECOND_LENGTH, seed=seed)
    tokens[0, FIRST_LENGTH - 1] = EOD_ID
    tokens[0, -1] = EOD_ID
    if masked:
        tokens[0, [1, FIRST_LENGTH + 2]] = MASK_ID
    return tokens


def final_hidden_states(model, tokens, attention_mask=None) -> torch.Tensor:
    hidden_states, _ = model.model(tokens, attention_mask=attention_mask)
    return hidden_states


def replace_tokens(tokens: torch.Tensor, start: int, stop: int, seed: int) -> torch.Tensor:
    """Return a copy with other ordinary tokens at positions `start:stop`. EOD and mask tokens are kept."""
    changed = tokens.clone()
    span = changed[:, start:stop]
    ordinary = (span != EOD_ID) & (span != MASK_ID)
    span[ordinary] = random_tokens(1, stop - start, seed=seed)[ordinary]
    assert not torch.equal(changed, tokens)
    return changed


def test_config_requires_eod_token():
    with pytest.raises(ValueError, match="eod_token_id"):
        tiny_config(document_attention=True, eod_token_id=None)


def test_document_ids_count_preceding_eod_tokens():
    tokens = torch.tensor([[5, 6, EOD_ID, 7, EOD_ID, 8, 9]])
    assert document_ids(tokens, EOD_ID).tolist() == [[0, 0, 0, 1, 1, 2, 2]]


def test_positions_restart_after_each_eod():
    tokens = torch.tensor([[5, 6, EOD_ID, 7, EOD_ID, 8, 9], [EOD_ID, 5, 5, 5, 5, 5, 5]])
    positions = document_position_ids(document_ids(tokens, EOD_ID))
    assert positions.tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 0, 1, 2, 3, 4, 5]]


def test_single_document_rows_need_no_mask():
    tokens = torch.tensor([[5, 6, 7, EOD_ID], [5, 6, 7, 8]])
    assert document_attention_mask(document_ids(tokens, EOD_ID), None) is None


@pytest.mark.parametrize("use_rope", [True, False])
def test_first_document_ignores_second(use_rope):
    model = tiny_model(document_attention=True, use_rope=use_rope).eval()
    tokens = packed_block()
    changed = replace_tokens(tokens, FIRST_LENGTH, tokens.shape[1], seed=1)
    before = final_hidden_states(model, tokens)[:, :FIRST_LENGTH]
    after = final_hidden_states(model, changed)[:, :FIRST_LENGTH]
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("use_rope", [True, False])
def test_second_document_ignores_first(use_rope):
    model = tiny_model(document_attention=True, use_rope=use_rope).eval()
    tokens = packed_block()
    changed = replace_tokens(tokens, 0, FIRST_LENGTH, seed=2)
    before = final_hidden_states(model, tokens)[:, FIRST_LENGTH:]
    after = final_hidden_states(model, changed)[:, FIRST_LENGTH:]
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)


def test_documents_see_each_other_without_the_flag():
    model = tiny_model(document_attention=False).eval()
    tokens = packed_block()
    changed = replace_tokens(tokens, FIRST_LENGTH, tokens.shape[1], seed=1)
    before = final_hidden_states(model, tokens)[:, :FIRST_LENGTH]
    after = final_hidden_states(model, changed)[:, :FIRST_LENGTH]
    assert not torch.allclose(after, before)


@pytest.mark.parametrize("use_rope", [True, False])
def test_packed_document_matches_document_alone(use_rope):
    """Positions restart: the second document, packed after the first, computes what it computes alone at 0."""
    model = tiny_model(document_attention=True, use_rope=use_rope).eval()
    tokens = packed_block()
    packed = final_hidden_states(model, tokens)[:, FIRST_LENGTH:]
    alone = final_hidden_states(model, tokens[:, FIRST_LENGTH:])
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_rotary_receives_restarted_positions():
    model = tiny_model(document_attention=True).eval()
    rotary = model.model.rotary
    received = []
    original_forward = rotary.forward

    def recording_forward(position_ids, *args):
        received.append(position_ids)
        return original_forward(position_ids, *args)

    rotary.forward = recording_forward
    model(packed_block())
    expected = list(range(FIRST_LENGTH)) + list(range(SECOND_LENGTH))
    assert received[0].tolist() == [expected]


def test_explicit_position_ids_override_restarts():
    model = tiny_model(document_attention=True, use_rope=False).eval()
    tokens = packed_block()
    restarted = final_hidden_states(model, tokens)
    continuous = torch.arange(tokens.shape[1])[None]
    hidden_states, _ = model.model(tokens, position_ids=continuous)
    assert not torch.allclose(hidden_states[:, FIRST_LENGTH:], restarted[:, FIRST_LENGTH:])


def test_padding_combines_with_documents():
    model = tiny_model(document_attention=True).eval()
    tokens = packed_block()
    padded = torch.cat([tokens, torch.full((1, 3), PAD_ID)], dim=1)
    attention_mask = torch.cat([torch.ones_like(tokens), torch.zeros(1, 3, dtype=torch.long)], dim=1)
    with_padding = final_hidden_states(model, padded, attention_mask)[:, : tokens.shape[1]]
    without_padding = final_hidden_states(model, tokens)
    torch.testing.assert_close(with_padding, without_padding, rtol=1e-5, atol=1e-5)


def test_padding_only_document_gives_no_nan():
    model = tiny_model(document_attention=True).eval()
    tokens = torch.cat([packed_block(), torch.full((1, 4), PAD_ID)], dim=1)
    attention_mask = (tokens != PAD_ID).long()
    logits = model(tokens, attention_mask=attention_mask).logits
    assert not torch.isnan(logits).any()


def test_training_loss_runs_backward_with_documents():
    model = tiny_model(document_attention=True).train()
    clean = torch.cat([packed_block(seed=3, masked=False), packed_block(seed=4, masked=False)])
    masked = torch.zeros_like(clean, dtype=torch.bool)
    masked[:, [0, 2, 7, 8]] = True
    inputs = torch.where(masked, MASK_ID, clean)
    labels = torch.where(masked, clean, -100)
    loss = model(inputs, labels=labels, t=torch.tensor([0.4, 0.9])).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.lm_head.weight.grad is not None
