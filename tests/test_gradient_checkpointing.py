"""Gradient checkpointing recomputes the blocks in the backward pass and must not change the loss or gradients."""

import pytest
import torch

from conftest import EOD_ID, MASK_ID, random_tokens, tiny_model


def noised_batch():
    clean = random_tokens(2, 12)
    clean[:, 5] = EOD_ID
    masked = torch.zeros_like(clean, dtype=torch.bool)
    masked[:, [0, 3, 4, 8, 10]] = True
    return {
        "input_ids": torch.where(masked, MASK_ID, clean),
        "labels": torch.where(masked, clean, -100),
        "t": torch.tensor([0.3, 0.8]),
    }


def loss_and_gradients(checkpointing: bool, **overrides):
    model = tiny_model(**overrides).train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    loss = model(**noised_batch()).loss
    loss.backward()
    gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
    return model, loss.detach(), gradients


# transformers 5.25 deprecates gradient_checkpointing_enable in favour of activation_checkpointing_enable.
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("overrides", [{}, {"document_attention": True}, {"use_rope": False}])
def test_checkpointing_keeps_loss_and_gradients(overrides):
    _, expected_loss, expected_gradients = loss_and_gradients(False, **overrides)
    model, loss, gradients = loss_and_gradients(True, **overrides)
    assert all(block.gradient_checkpointing for block in model.model.layers)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    assert gradients.keys() == expected_gradients.keys()
    for name, gradient in gradients.items():
        torch.testing.assert_close(gradient, expected_gradients[name], rtol=1e-6, atol=1e-7, msg=name)
