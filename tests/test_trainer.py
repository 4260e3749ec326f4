"""MdlmTrainer: NELBO normalization across gradient accumulation, and reproducible evaluation."""

import pytest
import torch
from datasets import Dataset
from transformers import TrainingArguments, default_data_collator

from mdlm.collator import DataCollatorForMaskedDiffusion
from mdlm.noise_schedule import counted_token_mask
from mdlm.trainer import MdlmTrainer

from conftest import EOD_ID, MASK_ID, PAD_ID, random_tokens, tiny_model


def prenoised_dataset(num_examples=32, length=16, seed=0) -> Dataset:
    """Examples with fixed masks, times and uneven padding, so each micro-batch counts a different number of tokens."""
    generator = torch.Generator().manual_seed(seed)
    clean = random_tokens(num_examples, length, seed=seed)
    clean[:, 5] = EOD_ID
    lengths = torch.randint(4, length + 1, (num_examples,), generator=generator)
    attention_mask = (torch.arange(length)[None] < lengths[:, None]).long()
    clean = clean.masked_fill(attention_mask == 0, PAD_ID)
    t = torch.rand(num_examples, generator=generator) * 0.9 + 0.1
    masked = (torch.rand(num_examples, length, generator=generator) < t[:, None]) & (attention_mask == 1)
    masked &= clean != EOD_ID
    return Dataset.from_dict(
        {
            "input_ids": clean.masked_fill(masked, MASK_ID).tolist(),
            "labels": torch.where(masked, clean, -100).tolist(),
            "attention_mask": attention_mask.tolist(),
            "t": t.tolist(),
        }
    )


def one_sgd_step(tmp_path, batch_size, accumulation):
    model = tiny_model(seed=1)
    args = TrainingArguments(
        output_dir=str(tmp_path / f"bs{batch_size}-ga{accumulation}"), per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1.0, optim="sgd",
        lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1, report_to="none",
        save_strategy="no", seed=3, use_cpu=True,
    )
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = MdlmTrainer(model=model, args=args, train_dataset=prenoised_dataset(), data_collator=default_data_collator)
    trainer.train()
    updates = {name: before[name] - p.detach() for name, p in model.named_parameters()}  # = gradient at lr 1
    loss = next(entry["loss"] for entry in trainer.state.log_history if "loss" in entry)
    return loss, updates


def full_batch_nelbo() -> float:
    data = prenoised_dataset().with_format("torch")[:]
    model = tiny_model(seed=1)
    output = model(**data)
    return output.loss.item()


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    loss_large, updates_large = one_sgd_step(tmp_path, batch_size=32, accumulation=1)
    loss_accumulated, updates_accumulated = one_sgd_step(tmp_path, batch_size=8, accumulation=4)
    assert loss_large == pytest.approx(full_batch_nelbo(), rel=1e-5)
    assert loss_accumulated == pytest.approx(loss_large, rel=1e-5)
    for name, update in updates_large.items():
        torch.testing.assert_close(updates_accumulated[name], update, rtol=1e-5, atol=1e-7, msg=name)


def test_batch_count_uses_counted_tokens_not_masked_positions(tmp_path):
    model = tiny_model()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    trainer = MdlmTrainer(model=model, args=args, data_collator=default_data_collator)
    batch = default_data_collator([prenoised_dataset(num_examples=4)[i] for i in range(4)])
    _, count = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
    counted = counted_token_mask(batch["input_ids"], batch["labels"], batch["attention_mask"], MASK_ID, EOD_ID)
    assert count.item() == counted.sum().item()
    assert count.item() > (batch["labels"] != -100).sum().item()


def packed_eval_dataset(num_blocks=12, block=17) -> Dataset:
    tokens = random_tokens(num_blocks, block, seed=4)
    tokens[:, ::6] = EOD_ID
    return Dataset.from_dict({"input_ids": tokens.tolist()})


def eval_trainer(tmp_path, eval_seed=0) -> MdlmTrainer:
    model = tiny_model()
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_eval_batch_size=5, report_to="none", use_cpu=True
    )
    return MdlmTrainer(
        model=model, args=args, eval_dataset=packed_eval_dataset(), eval_seed=eval_seed,
        data_collator=DataCollatorForMaskedDiffusion(mask_token_id=MASK_ID, eod_token_id=EOD_ID, pad_token_id=PAD_ID),
    )


def test_evaluation_is_reproducible(tmp_path):
    trainer = eval_trainer(tmp_path)
    first = trainer.evaluate()
    second = trainer.evaluate()
    assert first["eval_loss"] == second["eval_loss"]
    assert first["eval_perplexity"] == pytest.approx(torch.tensor(first["eval_loss"]).exp().item(), rel=1e-6)


def test_evaluation_seed_changes_the_noise(tmp_path):
    assert eval_trainer(tmp_path, eval_seed=0).evaluate()["eval_loss"] != eval_trainer(
        tmp_path, eval_seed=1
    ).evaluate()["eval_loss"]


def test_evaluation_is_exact_nelbo_per_token(tmp_path):
    trainer = eval_trainer(tmp_path)
    metrics = trainer.evaluate()
    # Recompute with the same noise: one pass over the reseeded collator, summing before dividing.
    collate = trainer.data_collator.reseeded(0)
    dataset = packed_eval_dataset()
    nelbo, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), 5):
            batch = collate([dataset[i] for i in range(start, min(start + 5, len(dataset)))])
            output = trainer.model(**batch)
            nelbo += output.nelbo_sum.item()
            tokens += output.num_counted_tokens.item()
    assert metrics["eval_tokens"] == tokens
    assert metrics["eval_loss"] == pytest.approx(nelbo / tokens, rel=1e-6)
