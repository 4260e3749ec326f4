"""The NELBO, the SUBS parameterization and the time sampling."""

import math

import pytest
import torch

from mdlm.noise_schedule import LogLinearSchedule, counted_token_mask, sample_times

from conftest import EOD_ID, MASK_ID, PAD_ID, VOCAB_SIZE, random_tokens, tiny_model


def fixed_example():
    """Two rows of 6 tokens: row 0 has an EOD and two masks; row 1 has one mask and two padding positions."""
    clean = random_tokens(2, 6, seed=3)
    clean[0, 3] = EOD_ID
    clean[1, 4:] = PAD_ID
    attention_mask = torch.ones(2, 6, dtype=torch.long)
    attention_mask[1, 4:] = 0
    masked = torch.zeros(2, 6, dtype=torch.bool)
    masked[0, [1, 5]] = True
    masked[1, 2] = True
    inputs = clean.masked_fill(masked, MASK_ID)
    labels = torch.where(masked, clean, -100)
    t = torch.tensor([0.25, 0.8])
    return clean, inputs, labels, attention_mask, t


def test_loss_equals_hand_computation():
    model = tiny_model().eval()
    clean, inputs, labels, attention_mask, t = fixed_example()
    output = model(inputs, attention_mask=attention_mask, labels=labels, t=t)

    hidden, _ = model.model(inputs, attention_mask=attention_mask)
    logits = model.lm_head(hidden).double()
    allowed = (torch.arange(VOCAB_SIZE) < MASK_ID) & (torch.arange(VOCAB_SIZE) != PAD_ID)  # mask and up, and pad
    log_probs = logits.masked_fill(~allowed, -math.inf).log_softmax(-1)
    total = 0.0
    for row, col in [(0, 1), (0, 5), (1, 2)]:
        total += -log_probs[row, col, clean[row, col]].item() / t[row].item()
    counted = 5 + 4  # row 0: six tokens minus one EOD; row 1: four real tokens
    assert output.num_counted_tokens.item() == counted
    assert output.loss.item() == pytest.approx(total / counted, rel=1e-5)
    assert output.nelbo_sum.item() == pytest.approx(total, rel=1e-5)


def test_loss_divides_by_num_items_in_batch_when_given():
    model = tiny_model().eval()
    _, inputs, labels, attention_mask, t = fixed_example()
    output = model(inputs, attention_mask=attention_mask, labels=labels, t=t, num_items_in_batch=100)
    assert output.loss.item() == pytest.approx(output.nelbo_sum.item() / 100, rel=1e-6)


def test_subs_gives_mask_token_zero_probability():
    model = tiny_model().eval()
    inputs = random_tokens(2, 8)
    inputs[:, ::2] = MASK_ID
    probs = model(inputs).logits.exp()
    assert torch.all(probs[..., MASK_ID] == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 8))


def test_subs_never_predicts_padded_vocabulary_ids():
    model = tiny_model(tokenizer_vocab_size=50, mask_token_id=49)
    inputs = torch.full((1, 4), 49)
    probs = model(inputs).logits.exp()
    assert torch.all(probs[..., 49:] == 0)


def test_subs_never_predicts_padding():
    model = tiny_model().eval()
    probs = model(torch.full((1, 4), MASK_ID)).logits.exp()
    assert torch.all(probs[..., PAD_ID] == 0)


def test_subs_copies_unmasked_tokens():
    model = tiny_model().eval()
    inputs = random_tokens(2, 8)
    inputs[:, 1::2] = MASK_ID
    log_probs = model(inputs).logits
    unmasked = inputs != MASK_ID
    predicted = log_probs.argmax(-1)
    assert torch.equal(predicted[unmasked], inputs[unmasked])
    assert torch.all(log_probs.gather(-1, inputs.unsqueeze(-1)).squeeze(-1)[unmasked] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_finite_under_low_precision_autocast(dtype):
    model = tiny_model()
    _, inputs, labels, attention_mask, t = fixed_example()
    t = torch.tensor([1e-3, 1.0])  # the largest weight the sampler can produce
    with torch.autocast("cpu", dtype=dtype):
        output = model(inputs, attention_mask=attention_mask, labels=labels, t=t, return_logits=True)
    output.loss.backward()
    assert torch.isfinite(output.loss)
    assert not torch.isnan(output.logits).any()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_loss_weight_is_inverse_time():
    schedule = LogLinearSchedule(1e-3)
    t = torch.tensor([0.001, 0.25, 0.5, 1.0], dtype=torch.float64)
    # w(t) = -alpha'(t) / (1 - alpha(t)), computed here from the schedule by autograd.
    t_grad = t.clone().requires_grad_()
    (alpha_prime,) = torch.autograd.grad(schedule.alpha(t_grad).sum(), t_grad)
    torch.testing.assert_close(schedule.loss_weight(t), -alpha_prime / (1 - schedule.alpha(t)))
    torch.testing.assert_close(schedule.loss_weight(t), 1 / t)


def test_sample_times_are_stratified():
    n, eps = 16, 1e-3
    t = sample_times(n, eps, generator=torch.Generator().manual_seed(0)).double()
    assert t.min() >= eps
    assert t.max() <= 1.0
    gaps = (t.sort().values.diff())
    torch.testing.assert_close(gaps, torch.full_like(gaps, (1 - eps) / n), rtol=1e-5, atol=1e-6)


def test_sample_times_ranks_take_disjoint_strata_of_global_batch():
    per_rank, world = 4, 3
    slices = [
        sample_times(per_rank, 1e-3, generator=torch.Generator().manual_seed(7), rank=r, world_size=world)
        for r in range(world)
    ]
    whole = sample_times(per_rank * world, 1e-3, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(torch.cat(slices), whole)


def test_counted_mask_excludes_eod_and_padding():
    clean, inputs, labels, attention_mask, _ = fixed_example()
    counted = counted_token_mask(inputs, labels, attention_mask, MASK_ID, EOD_ID)
    assert not counted[0, 3]
    assert not counted[1, 4:].any()
    assert counted.sum().item() == 9
