#!/usr/bin/env python
"""Train a small causal LM (Llama architecture) to score MDLM samples for generative perplexity.

    python scripts/train_reference_causal_lm.py --output_dir outputs/kjv-causal-lm

By default it trains on the corpus and with the BPE tokenizer that ship with mdlm, so that an MDLM trained by
`run_mdlm.py` with default data options and this causal LM read the same tokens. The defaults train 4.1M
parameters for 600 steps of 16 blocks of 256 tokens, about 2.6 epochs of that corpus. The folder gets the model,
the tokenizer and `eval_results.json`, whose `perplexity` is the causal LM's own validation perplexity, so
readers can judge the judge. Any `transformers.TrainingArguments` flag works too.
"""

import json
import logging
import math
import sys
from dataclasses import dataclass, field

import transformers
from transformers import (
    DataCollatorForLanguageModeling, HfArgumentParser, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments,
    set_seed,
)

from mdlm.arguments import parse_arguments
from mdlm.data import load_raw_datasets, load_tokenizer, tokenize_and_pack


logger = logging.getLogger(__name__)

TRAINING_DEFAULTS = {
    "output_dir": "outputs/kjv-causal-lm",
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "learning_rate": 2e-3,
    "weight_decay": 0.1,
    "adam_beta2": 0.98,
    "warmup_steps": 50,
    "lr_scheduler_type": "cosine",
    "max_steps": 600,
    "logging_steps": 50,
    "eval_strategy": "no",
    "save_strategy": "no",
    "report_to": "none",
}


@dataclass
class CausalLmArguments:
    """Shape of the causal LM and the text it is trained on."""

    data_file: str | None = field(
        default=None, metadata={"help": "Training text (.txt, .json, .jsonl, .csv, .parquet). Default: mdlm's corpus."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Validation text in the same format. Default: mdlm's validation split."}
    )
    hf_tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer folder or Hub name. Default: the BPE tokenizer of mdlm."}
    )
    max_seq_length: int = field(
        default=256, metadata={"help": "Context length in tokens; training blocks have this length. Default 256."}
    )
    hidden_size: int = field(default=256, metadata={"help": "Model width. Default 256."})
    num_hidden_layers: int = field(default=4, metadata={"help": "Number of decoder layers. Default 4."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads. Default 4."})
    intermediate_size: int = field(default=640, metadata={"help": "SwiGLU width. Default 640."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many validation blocks."})


def build_model(args: CausalLmArguments, tokenizer) -> LlamaForCausalLM:
    # The mdlm tokenizer has no BOS token, so the end-of-document token also marks the start of a document.
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_hidden_layers, num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_attention_heads, max_position_embeddings=args.max_seq_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def main(argv: list[str] | None = None) -> dict:
    parser = HfArgumentParser((CausalLmArguments, TrainingArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    args, training_args = parse_arguments(parser, argv)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO,
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    transformers.utils.logging.set_verbosity_warning()
    set_seed(training_args.seed)

    tokenizer = load_tokenizer(args.hf_tokenizer)
    raw = load_raw_datasets(data_file=args.data_file, validation_file=args.validation_file, seed=training_args.seed)
    # tokenize_and_pack makes blocks of `max_seq_length + 1` ids, the layout of the MDLM collator.
    blocks = tokenize_and_pack(raw, tokenizer, "text", args.max_seq_length - 1)
    eval_dataset = blocks["validation"]
    if args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(len(eval_dataset), args.max_eval_samples)))

    model = build_model(args, tokenizer)
    num_parameters = sum(parameter.numel() for parameter in model.parameters())
    logger.info(
        f"Causal LM: {num_parameters / 1e6:.2f}M parameters, {len(blocks['train'])} training and "
        f"{len(eval_dataset)} validation blocks of {args.max_seq_length} tokens."
    )
    trainer = Trainer(
        model=model, args=training_args, train_dataset=blocks["train"], eval_dataset=eval_dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False), processing_class=tokenizer,
    )
    train_metrics = trainer.train().metrics
    trainer.save_model()

    # The Trainer averages the loss over examples, and every block has the same length, so `eval_loss` is the
    # loss per token of the whole validation set.
    metrics = trainer.evaluate()
    metrics["perplexity"] = math.exp(metrics["eval_loss"])
    metrics["num_parameters"] = num_parameters
    metrics["train_runtime"] = train_metrics["train_runtime"]
    trainer.save_metrics("eval", metrics)
    print(json.dumps(metrics, indent=2))
    return metrics


if __name__ == "__main__":
    main()
