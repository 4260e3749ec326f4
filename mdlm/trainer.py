"""`MdlmTrainer`: a `transformers.Trainer` whose loss is the MDLM NELBO per counted token."""

import math

import torch
from transformers import Trainer
from transformers.trainer_utils import EvalLoopOutput
from transformers.utils import logging

from .collator import DataCollatorForMaskedDiffusion
from .noise_schedule import counted_token_mask


logger = logging.get_logger(__name__)


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

    Args:
        eval_seed (`int`, *optional*, defaults to 0): Seed of the evaluation noise.
        All other arguments are those of `transformers.Trainer`.
    """

    # The loss is already normalized over the whole accumulated batch, so the Trainer must not divide it again.
    loss_is_scaled_for_ga = True

    def __init__(self, *args, eval_seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.eval_seed = eval_seed

    def _count_tokens(self, batch: dict) -> torch.Tensor:
        config = self.accelerator.unwrap_model(self.model).config
        counted = counted_token_mask(
            batch["input_ids"], batch["labels"], batch.get("attention_mask"), config.mask_token_id,
            config.eod_token_id,
        )
        return counted.sum()

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the micro-batches of one optimizer step and count their tokens across all ranks."""
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
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
