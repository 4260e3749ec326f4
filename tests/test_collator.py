"""EOD-aware masking in DataCollatorForMaskedDiffusion."""

import torch

from mdlm.collator import DataCollatorForMaskedDiffusion
from mdlm.noise_schedule import counted_token_mask

from conftest import EOD_ID, MASK_ID, PAD_ID, random_tokens


def packed_features(num_blocks=32, block=33, seed=0):
    tokens = random_tokens(num_blocks, block, seed=seed)
    tokens[:, ::7] = EOD_ID  # documents end every seven tokens
    return [{"input_ids": row.tolist()} for row in tokens], tokens


def collator(**overrides):
    settings = dict(mask_token_id=MASK_ID, eod_token_id=EOD_ID, pad_token_id=PAD_ID, seed=0)
    settings.update(overrides)
    return DataCollatorForMaskedDiffusion(**settings)


def test_last_token_of_packed_block_is_dropped():
    features, tokens = packed_features(num_blocks=4, block=33)
    batch = collator()(features)
    assert batch["input_ids"].shape == (4, 32)
    clean = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
    visible = batch["input_ids"] != MASK_ID
    assert torch.equal(clean[visible], tokens[:, :32][visible])


def test_eod_is_never_a_label_or_masked():
    features, tokens = packed_features()
    batch = collator()(features)
    is_eod = tokens[:, :32] == EOD_ID
    assert torch.all(batch["labels"][is_eod] == -100)
    assert torch.all(batch["input_ids"][is_eod] == EOD_ID)


def test_eod_never_counted():
    features, tokens = packed_features()
    batch = collator()(features)
    counted = counted_token_mask(batch["input_ids"], batch["labels"], batch["attention_mask"], MASK_ID, EOD_ID)
    is_eod = tokens[:, :32] == EOD_ID
    assert not counted[is_eod].any()
    assert counted.sum() == (~is_eod).sum()


def test_noise_eod_masks_eod_without_label_or_count():
    features, tokens = packed_features(num_blocks=64)
    batch = collator(noise_eod=True)(features)
    is_eod = tokens[:, :32] == EOD_ID
    masked_eod = is_eod & (batch["input_ids"] == MASK_ID)
    assert masked_eod.any()
    assert torch.all(batch["labels"][is_eod] == -100)
    counted = counted_token_mask(batch["input_ids"], batch["labels"], batch["attention_mask"], MASK_ID, EOD_ID)
    assert not counted[is_eod].any()


def test_padding_never_masked_or_counted():
    rows = [random_tokens(1, n, seed=n)[0].tolist() for n in (5, 12, 9, 3)]
    batch = collator(drop_last_token=False)([{"input_ids": r} for r in rows] * 8)
    padding = batch["attention_mask"] == 0
    assert padding.sum() == sum(12 - len(r) for r in rows) * 8
    assert torch.all(batch["input_ids"][padding] == PAD_ID)
    assert torch.all(batch["labels"][padding] == -100)
    counted = counted_token_mask(batch["input_ids"], batch["labels"], batch["attention_mask"], MASK_ID, EOD_ID)
    assert not counted[padding].any()


def test_masked_fraction_follows_one_minus_alpha():
    tokens = random_tokens(64, 2001, seed=1)
    batch = collator()([{"input_ids": row.tolist()} for row in tokens])
    fraction = (batch["input_ids"] == MASK_ID).float().mean(dim=1)
    expected = (1 - 1e-3) * batch["t"]
    # 2000 Bernoulli draws per row: the standard deviation of the fraction is at most 0.0112.
    assert (fraction - expected).abs().max() < 0.05
    assert torch.corrcoef(torch.stack([fraction, expected]))[0, 1] > 0.99


def test_times_are_stratified_within_batch():
    features, _ = packed_features(num_blocks=8)
    t = collator()(features)["t"].double()
    gaps = t.sort().values.diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, (1 - 1e-3) / 8), rtol=1e-5, atol=1e-6)


def test_labels_hold_clean_tokens_at_masked_positions():
    features, tokens = packed_features()
    batch = collator()(features)
    masked = batch["input_ids"] == MASK_ID
    assert torch.equal(batch["labels"][masked], tokens[:, :32][masked])
    assert torch.all(batch["labels"][~masked] == -100)


def test_reseeded_collator_repeats_its_noise():
    features, _ = packed_features()
    first = collator().reseeded(5)(features)
    second = collator().reseeded(5)(features)
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_ranks_draw_different_masks_with_shared_strata():
    features, _ = packed_features(num_blocks=4)
    rank0 = collator(rank=0, world_size=2)(features)
    rank1 = collator(rank=1, world_size=2)(features)
    assert not torch.equal(rank0["input_ids"], rank1["input_ids"])
    assert not torch.equal(rank0["t"], rank1["t"])
    together = torch.cat([rank0["t"], rank1["t"]]).double().sort().values
    gaps = together.diff()
    torch.testing.assert_close(gaps, torch.full_like(gaps, (1 - 1e-3) / 8), rtol=1e-5, atol=1e-6)


def test_loader_workers_draw_different_noise():
    features, _ = packed_features(num_blocks=8)
    loader = torch.utils.data.DataLoader(features, batch_size=2, num_workers=2, collate_fn=collator())
    times = [batch["t"] for batch in loader]
    assert len(times) == 4
    assert not torch.equal(times[0], times[1])
    assert len({tuple(t.tolist()) for t in times}) == 4
