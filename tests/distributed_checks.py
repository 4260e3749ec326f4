"""Training checks that run inside each rank of a two-process gloo job, for tests/test_distributed.py.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_checks.py OUTPUT_DIR

Each rank trains with the real `MdlmTrainer` and writes what it observed (example ids, times, token counts,
parameter updates, final parameters) to `OUTPUT_DIR/rank{RANK}.pt`. The tests compare the ranks' records with
each other and with single-process runs. The dataset and argument builders here are shared with those tests.
"""

import os
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import TrainingArguments, default_data_collator

from mdlm.collator import DataCollatorForMaskedDiffusion
from mdlm.trainer import MdlmTrainer

from conftest import EOD_ID, MASK_ID, PAD_ID, random_tokens, tiny_model


# Real lengths of the four pre-noised examples. Position 5 holds an end-of-document token (padding in the
# shortest), so they count 15, 14, 8 and 3 tokens. No split into two pairs gives both pairs the same count, so the
# ranks of a two-process run always count different numbers of tokens.
UNEVEN_LENGTHS = (16, 15, 9, 3)
SEQUENCE_LENGTH = 16
NUM_PACKED_BLOCKS = 16
BLOCK_LENGTH = 33  # packed blocks of max_seq_length + 1, as run_mdlm.py builds them
COLLATOR_SEED = 7


def uneven_prenoised_dataset() -> Dataset:
    """Four examples with fixed masks, times and uneven padding, numbered by `example_id`."""
    generator = torch.Generator().manual_seed(11)
    num_examples = len(UNEVEN_LENGTHS)
    clean = random_tokens(num_examples, SEQUENCE_LENGTH, seed=12)
    clean[:, 5] = EOD_ID
    lengths = torch.tensor(UNEVEN_LENGTHS)
    attention_mask = (torch.arange(SEQUENCE_LENGTH)[None] < lengths[:, None]).long()
    clean = clean.masked_fill(attention_mask == 0, PAD_ID)
    t = torch.rand(num_examples, generator=generator) * 0.8 + 0.2
    masked = (torch.rand(num_examples, SEQUENCE_LENGTH, generator=generator) < t[:, None]) & (attention_mask == 1)
    masked &= clean != EOD_ID
    return Dataset.from_dict(
        {
            "input_ids": clean.masked_fill(masked, MASK_ID).tolist(),
            "labels": torch.where(masked, clean, -100).tolist(),
            "attention_mask": attention_mask.tolist(),
            "t": t.tolist(),
            "example_id": list(range(num_examples)),
        }
    )


def packed_dataset() -> Dataset:
    """Clean packed blocks with a few end-of-document tokens, numbered by `example_id`."""
    tokens = random_tokens(NUM_PACKED_BLOCKS, BLOCK_LENGTH, seed=13)
    tokens[:, ::10] = EOD_ID
    return Dataset.from_dict({"input_ids": tokens.tolist(), "example_id": list(range(NUM_PACKED_BLOCKS))})


def sgd_step_arguments(output_dir, batch_size: int, accumulation: int) -> TrainingArguments:
    """One plain SGD step at learning rate 1 without clipping, so the parameter update equals the gradient."""
    return TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_steps=1, learning_rate=1.0, optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0,
        weight_decay=0.0, logging_steps=1, report_to="none", save_strategy="no", seed=3, use_cpu=True,
        remove_unused_columns=False,
    )


def packed_training_arguments(output_dir, batch_size: int) -> TrainingArguments:
    """Four AdamW steps over the packed blocks, checkpointing after step 2."""
    return TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=batch_size, max_steps=4, learning_rate=1e-2,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="steps", save_steps=2, report_to="none",
        seed=3, use_cpu=True, remove_unused_columns=False,
    )


class CollatorKeepingIds(DataCollatorForMaskedDiffusion):
    """The MDLM collator, with each batch's `example_id` column passed through for `RecordingTrainer`."""

    def __call__(self, features):
        batch = super().__call__(features)
        batch["example_id"] = torch.tensor([feature["example_id"] for feature in features])
        return batch


def packed_collator() -> CollatorKeepingIds:
    return CollatorKeepingIds(mask_token_id=MASK_ID, eod_token_id=EOD_ID, pad_token_id=PAD_ID, seed=COLLATOR_SEED)


class RecordingTrainer(MdlmTrainer):
    """An `MdlmTrainer` that records each micro-batch's example ids and times and each step's token counts."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.example_ids, self.times, self.local_counts, self.global_counts = [], [], [], []

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batch_samples:
            self.local_counts.append(sum(self._count_tokens(batch).item() for batch in batch_samples))
            self.global_counts.append(num_items_in_batch.item())
        return batch_samples, num_items_in_batch

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.example_ids.append(inputs.pop("example_id").tolist())
        self.times.append(inputs["t"].tolist())
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def logged_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def parameters_of(model) -> dict[str, torch.Tensor]:
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def run_sgd_step(output_dir, batch_size: int, accumulation: int) -> dict:
    """Train one SGD step on the uneven pre-noised examples and return the loss, the update and what this rank saw."""
    model = tiny_model(seed=1)
    before = parameters_of(model)
    trainer = RecordingTrainer(
        model=model, args=sgd_step_arguments(output_dir, batch_size, accumulation),
        train_dataset=uneven_prenoised_dataset(), data_collator=default_data_collator,
    )
    trainer.train()
    after = parameters_of(model)
    return {
        "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
        "distributed_type": trainer.accelerator.distributed_type.value,
        "world_size": trainer.args.world_size,
        "loss": logged_losses(trainer)[0],
        "updates": {name: before[name] - after[name] for name in before},  # the gradient, at learning rate 1
        "example_ids": trainer.example_ids,
        "local_counts": trainer.local_counts,
        "global_counts": trainer.global_counts,
    }


def draw_collator_noise() -> dict:
    """Collate the same four blocks twice with seed 7 and once with seed 8; rank and world size come from the group."""
    features = [{"input_ids": row} for row in random_tokens(4, BLOCK_LENGTH, seed=14).tolist()]
    collator = DataCollatorForMaskedDiffusion(mask_token_id=MASK_ID, eod_token_id=EOD_ID, seed=COLLATOR_SEED)
    first = collator(features)
    repeat = DataCollatorForMaskedDiffusion(mask_token_id=MASK_ID, eod_token_id=EOD_ID, seed=COLLATOR_SEED)(features)
    other_seed = DataCollatorForMaskedDiffusion(mask_token_id=MASK_ID, eod_token_id=EOD_ID, seed=COLLATOR_SEED + 1)
    return {
        "rank": collator.rank,
        "world_size": collator.world_size,
        "sampling_eps": collator.sampling_eps,
        "t": first["t"],
        "input_ids": first["input_ids"],
        "repeat_t": repeat["t"],
        "repeat_input_ids": repeat["input_ids"],
        "other_seed_t": other_seed(features)["t"],
    }


def train_packed(output_dir, resume_from_checkpoint=None) -> dict:
    """Train four steps on the packed blocks with the MDLM collator, from scratch or from a checkpoint."""
    # A resumed run starts from other weights, which the checkpoint must overwrite.
    model = tiny_model(seed=1 if resume_from_checkpoint is None else 5)
    trainer = RecordingTrainer(
        model=model, args=packed_training_arguments(output_dir, batch_size=2), train_dataset=packed_dataset(),
        data_collator=packed_collator(),
    )
    trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    return {
        "example_ids": trainer.example_ids,
        "times": trainer.times,
        "losses": logged_losses(trainer),
        "global_step": trainer.state.global_step,
        "parameters": parameters_of(model),
    }


def check_misconfigured_arguments_rejected(output_dir) -> str:
    """Return the error that MdlmTrainer raises for arguments that would train every rank alone."""
    args = TrainingArguments(output_dir=str(output_dir), report_to="none")  # no use_cpu on a machine without GPU
    try:
        MdlmTrainer(model=tiny_model(), args=args, data_collator=default_data_collator)
    except ValueError as error:
        return str(error)
    return ""


def main(output_dir: Path):
    rank = int(os.environ["RANK"])
    record = {
        "sgd_step": run_sgd_step(output_dir / "sgd-step", batch_size=2, accumulation=1),
        "sgd_step_accumulated": run_sgd_step(output_dir / "sgd-step-accumulated", batch_size=1, accumulation=2),
        "noise": draw_collator_noise(),
        "packed": train_packed(output_dir / "packed"),
        "packed_resumed": train_packed(
            output_dir / "packed-resumed", resume_from_checkpoint=str(output_dir / "packed" / "checkpoint-2")
        ),
        "misconfigured_error": check_misconfigured_arguments_rejected(output_dir / "misconfigured"),
    }
    torch.save(record, output_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
