"""`MdlmTrainer`: a `transformers.Trainer` whose loss is the MDLM NELBO per counted token."""

import math
import os
from pathlib import Path

import torch
from transformers import Trainer
from transformers.trainer_utils import EvalLoopOutput
from transformers.utils import logging

from .collator import DataCollatorForMaskedDiffusion
from .noise_schedule import counted_token_mask


logger = logging.get_logger(__name__)

# Per-process file, next to the Trainer's `rng_state_*.pth`, with the collator's noise state at a checkpoint.
NOISE_STATE_FILE = "noise_state_{process_index}.pth"
# Noise states kept from before the most recent batches. The train loader collates one batch ahead of training
# (accelerate 1.16's DataLoaderShard looks ahead to detect the last batch), so two are enough and eight leave room.
RECENT_NOISE_STATES = 8


class NoiseStateRecorder:
    """Call the MDLM collator and keep its noise state from before each of the last few batches it collated.

    A checkpoint must continue the noise at the first batch not yet trained on, which the loader has usually
    collated already, so the collator's current state is one batch too far.
    """

    def __init__(self, collator: DataCollatorForMaskedDiffusion):
        self.collator = collator
        self.batches_collated = 0
        self.states_before_batch = {}

    def __call__(self, features):
        self.states_before_batch[self.batches_collated] = self.collator.state_dict()
        self.states_before_batch.pop(self.batches_collated - RECENT_NOISE_STATES, None)
        self.batches_collated += 1
        return self.collator(features)

    def state_before(self, batch_index: int) -> dict | None:
        """Return the noise state from before batch `batch_index`, or None when it is no longer kept."""
        if batch_index == self.batches_collated:
            return self.collator.state_dict()
        return self.states_before_batch.get(batch_index)

    def restore(self, state: dict, batches_collated: int):
        self.collator.load_state_dict(state)
        self.batches_collated = batches_collated
        self.states_before_batch = {}


class MdlmTrainer(Trainer):
    """Train and evaluate an MDLM with the NELBO normalized by the number of counted tokens.

    The Trainer's default `num_items_in_batch` counts labels that are not -100, which for MDLM are the masked
    positions only. The NELBO divides by every counted token (neither padding nor end-of-document), masked or not,
    so this class counts those instead, over all gradient-accumulation micro-batches and all ranks. Each
    micro-batch's loss is then `nelbo_sum / global_count`, and the summed (or DDP-averaged, then rescaled)
    gradients equal those of one large batch.

    Evaluation returns `eval_loss`, the exact NELBO per counted token over the evaluation set, and
    `eval_perplexity`, its `exp`, an upper bound on perplexity. The evaluation collator draws its noise from
    `eval_seed` afresh each time, so the same checkpoint gives the same numbers twice.

    Checkpoints also store each rank's training-noise state (`noise_state_{rank}.pth`), so a run resumed with the
    same number of processes draws the masks and times it would have drawn without the interruption. This holds
    for map-style datasets, such as the packed blocks of run_mdlm.py, whose skipped batches are never collated.

    Args:
        eval_seed (`int`, *optional*, defaults to 0): Seed of the evaluation noise.
        All other arguments are those of `transformers.Trainer`.
    """

    # The loss is already normalized over the whole accumulated batch, so the Trainer must not divide it again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, eval_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_seed = eval_seed
        self._noise_recorder = None
        self._batches_trained = 0
        self._check_all_ranks_train_together()
        if self.args.fsdp and not self.is_fsdp_enabled:
            logger.warning(
                "FSDP was requested but is not enabled: accelerate 1.16 shards models only in multi-GPU (or other "
                "accelerator) runs, so every process trains a full copy of the model with DDP."
            )

    def _check_all_ranks_train_together(self):
        launched_processes = int(os.environ.get("WORLD_SIZE", "1"))
        if launched_processes > 1 and self.args.world_size == 1:
            raise ValueError(
                f"The launcher started {launched_processes} processes (WORLD_SIZE={launched_processes}), but "
                "TrainingArguments sees world_size=1, so every process would train alone on the whole dataset. On a "
                "machine without GPUs pass use_cpu=True (--use_cpu) so that accelerate trains the processes together "
                "over gloo."
            )

    def _count_tokens(self, batch: dict) -> torch.Tensor:
        config = self.accelerator.unwrap_model(self.model).config
        counted = counted_token_mask(
            batch["input_ids"], batch["labels"], batch.get("attention_mask"), config.mask_token_id,
            config.eod_token_id,
        )
        return counted.sum()

    def get_train_dataloader(self):
        """Build the training loader, recording the MDLM collator's noise states for checkpoints."""
        self._noise_recorder = None
        self._batches_trained = 0
        collator = self.data_collator
        if not isinstance(collator, DataCollatorForMaskedDiffusion):
            return super().get_train_dataloader()
        if self.args.dataloader_num_workers > 0:
            # NOTE: loader worker processes collate with copies of the collator, whose states never reach this
            # process, so checkpoints then hold no noise state and a resumed run restarts the noise from the seed.
            logger.warning("With dataloader_num_workers > 0, checkpoints do not store the collator's noise state.")
            return super().get_train_dataloader()
        self._noise_recorder = NoiseStateRecorder(collator)
        self.data_collator = self._noise_recorder
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collator

    # NOTE: `_init_training_state` and `_save_rng_state` are private hooks of the transformers 5.25 Trainer. A
    # version without them never calls these overrides, and its checkpoints then carry no noise state.
    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ):
        """Load the Trainer's state, then the noise state, before the resumed run collates its first batch."""
        result = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if resume_from_checkpoint is not None:
            self._load_noise_state(resume_from_checkpoint)
        return result

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self._noise_recorder is None:
            return
        state = self._noise_recorder.state_before(self._batches_trained)
        if state is None:
            logger.warning(
                f"The noise state before batch {self._batches_trained} is no longer kept, so the checkpoint in "
                f"{output_dir} stores none and a run resumed from it restarts the noise from the seed."
            )
            return
        path = Path(output_dir) / NOISE_STATE_FILE.format(process_index=self.args.process_index)
        torch.save({"batches_trained": self._batches_trained, "collator": state}, path)

    def _load_noise_state(self, checkpoint: str):
        if self._noise_recorder is None:
            return
        path = Path(checkpoint) / NOISE_STATE_FILE.format(process_index=self.args.process_index)
        if not path.is_file():
            logger.warning(f"No noise state at {path}: the training noise restarts from the collator's seed.")
            return
        saved = torch.load(path, weights_only=True)
        saved_world_size = saved["collator"]["world_size"]
        if saved_world_size != self.args.world_size:
            logger.warning(
                f"The checkpoint's noise state comes from a run of {saved_world_size} processes and this run has "
                f"{self.args.world_size}, so the training noise restarts from the collator's seed."
            )
            return
        self._noise_recorder.restore(saved["collator"], saved["batches_trained"])
        self._batches_trained = saved["batches_trained"]

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the micro-batches of one optimizer step and count their tokens across all ranks."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        self._batches_trained += len(batch_samples)
        if not batch_samples:
            return batch_samples, None
        num_counted = sum(self._count_tokens(batch) for batch in batch_samples).to(device)
        if self.accelerator.num_processes > 1:
            num_counted = self.accelerator.reduce(num_counted, reduction="sum")
        return batch_samples, num_counted.clamp(min=1)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Return `nelbo_sum / num_items_in_batch`, scaled by the world size to undo DDP's gradient averaging."""
        outputs = model(**inputs, num_items_in_batch=num_items_in_batch)
        loss = outputs.loss
        if num_items_in_batch is not None and self.accelerator.num_processes > 1 and model.training:
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def get_eval_dataloader(self, eval_dataset=None):
        """Build the evaluation loader with a collator reseeded from `eval_seed`, for reproducible noise."""
        train_collator = self.data_collator
        if isinstance(train_collator, DataCollatorForMaskedDiffusion):
            self.data_collator = train_collator.reseeded(self.eval_seed)
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def _prepare_model_for_evaluation(self):
        """Wrap the model for evaluation outside training, as `Trainer.evaluation_loop` does."""
        if self.is_deepspeed_enabled and self.deepspeed is None:
            from transformers.integrations.deepspeed import deepspeed_init

            deepspeed_init(self, num_training_steps=0, inference=True)
        model = self._wrap_model(self.model, training=False)
        if len(self.accelerator._models) == 0 and model is self.model:
            if self.is_deepspeed_enabled or (self.is_fsdp_enabled and not self.args.torch_compile):
                model = self.accelerator.prepare(model)
            else:
                model = self.accelerator.prepare_model(model, evaluation_mode=True)
            if self.is_fsdp_enabled:
                self.model = model
            if model is not self.model:
                self.model_wrapped = model
            if self.is_deepspeed_enabled:
                self.deepspeed = self.model_wrapped
        return model

    def evaluation_loop(
        self, dataloader, description, prediction_loss_only=None, ignore_keys=None, metric_key_prefix="eval"
    ) -> EvalLoopOutput:
        """Sum the NELBO and the counted tokens over the whole set, then divide once."""
        model = self._prepare_model_for_evaluation()
        model.eval()
        logger.info(f"***** Running {description} on {self.num_examples(dataloader)} examples *****")

        nelbo_total = torch.zeros((), dtype=torch.float64, device=self.args.device)
        tokens_total = torch.zeros((), dtype=torch.float64, device=self.args.device)
        num_examples = 0
        for batch in dataloader:
            batch = self._prepare_inputs(batch)
            with torch.no_grad(), self.compute_loss_context_manager():
                outputs = model(**batch)
            example_nelbo = self.accelerator.gather_for_metrics(outputs.example_nelbo.detach().double())
            example_tokens = self.accelerator.gather_for_metrics(outputs.example_num_counted_tokens.double())
            nelbo_total += example_nelbo.sum()
            tokens_total += example_tokens.sum()
            num_examples += example_nelbo.shape[0]

        nelbo_per_token = (nelbo_total / tokens_total.clamp(min=1)).item()
        metrics = {
            f"{metric_key_prefix}_loss": nelbo_per_token,
            f"{metric_key_prefix}_perplexity": math.exp(min(nelbo_per_token, 700.0)),
            f"{metric_key_prefix}_tokens": int(tokens_total.item()),
        }
        return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics, num_samples=num_examples)


__all__ = ["MdlmTrainer"]
