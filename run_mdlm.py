#!/usr/bin/env python
"""Train a Masked Diffusion Language Model (MDLM) with the Hugging Face Trainer.

With no data arguments it trains a small model on the corpus that ships with mdlm (the King James Bible) with
the BPE tokenizer that ships with it:

    python run_mdlm.py

Other text: `--data_file train.txt` (or .json, .jsonl, .csv, .parquet), `--hf_raw_repo NAME_OR_FOLDER` with
`--hf_raw_split CONFIG`, `--hf_tokenizer NAME_OR_FOLDER`. Any `transformers.TrainingArguments` flag works too, and
the short flags `--epochs`, `--batch_size`, `--d_model`, `--n_heads`, `--n_layers`, `--d_ff`. `--distributed`
relaunches the script with one process per GPU. Run `python run_mdlm.py --help` for every option.
"""

import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import datasets
import transformers
from torch.distributed.elastic.multiprocessing.errors import record
from transformers import HfArgumentParser, TrainingArguments, set_seed
from transformers.hf_argparser import string_to_bool
from transformers.trainer_utils import IntervalStrategy, get_last_checkpoint

from mdlm import MdlmConfig, MdlmForMaskedDiffusion
from mdlm.arguments import DataArguments, ModelArguments, RunArguments, parse_arguments
from mdlm.collator import DataCollatorForMaskedDiffusion
from mdlm.data import load_raw_datasets, load_tokenizer, tokenize_and_pack
from mdlm.distributed import cpu_distributed_defaults, maybe_relaunch_distributed
from mdlm.plotting import plot_training_curves
from mdlm.trainer import MdlmTrainer


logger = logging.getLogger(__name__)

# Defaults sized so that `python run_mdlm.py` trains visibly in minutes on a laptop CPU.
TRAINING_DEFAULTS = {
    "output_dir": "outputs/mdlm",
    "per_device_train_batch_size": 16,
    "per_device_eval_batch_size": 32,
    "learning_rate": 1e-3,
    "weight_decay": 0.0,
    "adam_beta2": 0.98,
    "warmup_steps": 50,
    "lr_scheduler_type": "cosine",
    "max_steps": 1000,
    "logging_steps": 20,
    "eval_strategy": "steps",
    "eval_steps": 200,
    "save_steps": 500,
    "save_total_limit": 2,
    "report_to": "none",
    # Every MDLM parameter gets a gradient in every step, so DDP can skip its search for unused ones.
    "ddp_find_unused_parameters": False,
}


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, RunArguments))
    parser.set_defaults(**TRAINING_DEFAULTS)
    # Under torchrun or accelerate launch without a GPU, each rank needs use_cpu and the gloo backend, or accelerate
    # trains every rank as an unrelated single process. Flags on the command line still override these.
    parser.set_defaults(**cpu_distributed_defaults())
    return parser


def setup_logging(training_args: TrainingArguments):
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%m/%d/%Y %H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    # "passive" (the default) means INFO on the main process and WARNING elsewhere, as in run_mlm.py.
    if training_args.log_level == "passive" and training_args.should_log:
        log_level = logging.INFO
    else:
        log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.enable_default_handler()
    transformers.utils.logging.enable_explicit_format()


def apply_short_flags(training_args: TrainingArguments, run_args: RunArguments):
    if run_args.epochs is not None:
        training_args.num_train_epochs = run_args.epochs
        training_args.max_steps = -1  # epochs, when given, decide the length instead of the default step count
    if run_args.batch_size is not None:
        training_args.per_device_train_batch_size = run_args.batch_size
        training_args.per_device_eval_batch_size = run_args.batch_size


def find_checkpoint_to_resume(training_args: TrainingArguments, run_args: RunArguments) -> str | None:
    """Return the checkpoint to resume from: `--resume_from_checkpoint`, else the last one in the output folder."""
    if training_args.resume_from_checkpoint is not None:
        if not Path(training_args.resume_from_checkpoint).is_dir():
            raise FileNotFoundError(
                f"--resume_from_checkpoint {training_args.resume_from_checkpoint} not found. Pass a checkpoint folder."
            )
        return training_args.resume_from_checkpoint
    output_dir = Path(training_args.output_dir)
    if not output_dir.is_dir() or run_args.overwrite_output_dir or not training_args.do_train:
        return None
    last_checkpoint = get_last_checkpoint(str(output_dir))
    if last_checkpoint is not None:
        logger.info(
            f"Resuming from {last_checkpoint}, the last checkpoint in {output_dir}. "
            "Pass --overwrite_output_dir to start over."
        )
    return last_checkpoint


# Options of ModelArguments that shape only a new model, because a checkpoint brings its own values.
ARCHITECTURE_OPTIONS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "use_rope", "rope_theta",
    "rope_percent", "max_position_embeddings", "hidden_dropout", "attention_dropout", "document_attention",
    "pad_vocab_to_multiple_of",
)
MODEL_DEFAULTS = {option.name: option.default for option in dataclasses.fields(ModelArguments)}


def build_model(model_args: ModelArguments, data_args: DataArguments, tokenizer) -> MdlmForMaskedDiffusion:
    """Load the checkpoint in `--model_name_or_path`, or build a new model sized for the tokenizer."""
    if model_args.model_name_or_path is not None:
        ignored = [f"--{name}" for name in ARCHITECTURE_OPTIONS if getattr(model_args, name) != MODEL_DEFAULTS[name]]
        if ignored:
            logger.warning(
                f"--model_name_or_path {model_args.model_name_or_path} fixes the architecture, so "
                f"{', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} ignored. Drop them, or leave out "
                "--model_name_or_path to train a new model."
            )
        model = MdlmForMaskedDiffusion.from_pretrained(model_args.model_name_or_path)
        if model.config.mask_token_id != tokenizer.mask_token_id:
            raise ValueError(
                f"The checkpoint's mask_token_id={model.config.mask_token_id} differs from the tokenizer's "
                f"{tokenizer.mask_token_id}. Pass the tokenizer the checkpoint was trained with (--hf_tokenizer)."
            )
        return model

    multiple = model_args.pad_vocab_to_multiple_of
    if multiple < 1:
        raise ValueError(f"Invalid pad_vocab_to_multiple_of={multiple}: it must be at least 1.")
    vocab_size = -(-len(tokenizer) // multiple) * multiple
    extra = {"document_attention": True} if model_args.document_attention else {}
    config = MdlmConfig(
        vocab_size=vocab_size,
        tokenizer_vocab_size=len(tokenizer),
        hidden_size=model_args.hidden_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        intermediate_size=model_args.intermediate_size,
        max_position_embeddings=model_args.max_position_embeddings or data_args.max_seq_length,
        use_rope=model_args.use_rope,
        rope_theta=model_args.rope_theta,
        rope_percent=model_args.rope_percent,
        hidden_dropout=model_args.hidden_dropout,
        attention_dropout=model_args.attention_dropout,
        mask_token_id=tokenizer.mask_token_id,
        eod_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )
    return MdlmForMaskedDiffusion(config)


def check_output_dir(training_args: TrainingArguments, run_args: RunArguments, last_checkpoint: str | None):
    """Reject a non-empty output folder without checkpoints, so that nothing already in it is overwritten."""
    output_dir = Path(training_args.output_dir)
    if not training_args.do_train or last_checkpoint is not None or run_args.overwrite_output_dir:
        return
    if output_dir.is_dir() and any(output_dir.iterdir()):
        raise ValueError(
            f"Output folder {output_dir} is not empty and contains no checkpoint to resume from. "
            "Pass another --output_dir, or --overwrite_output_dir to write into it anyway."
        )


def flag_value(argv: list[str], name: str) -> bool | None:
    """Return the boolean that `argv` gives flag `name` (`--x`, `--x VALUE` or `--x=VALUE`), or None if absent."""
    for index, flag in enumerate(argv):
        key, has_value, value = flag.partition("=")
        if key != name:
            continue
        if not has_value and index + 1 < len(argv) and not argv[index + 1].startswith("-"):
            value = argv[index + 1]
        return string_to_bool(value) if value else True
    return None


def choose_steps(training_args, argv: list[str]):
    """Set `do_train` and `do_eval` from the flags on the command line.

    With no step flag, the script trains and evaluates. Training stays on unless `--do_train False` is given or the
    command requests only an evaluation (`--do_eval` without `--do_train`). The command line is read instead of
    the parsed flags, because TrainingArguments turns `do_eval` on by itself whenever an eval_strategy is set.
    `--do_eval False` therefore also sets the eval_strategy to "no", unless the command sets one.
    """
    requested = {name: flag_value(argv, f"--{name}") for name in ("do_train", "do_eval", "do_predict")}
    if requested["do_predict"]:
        raise ValueError(
            "run_mdlm.py has no prediction step, so --do_predict is not supported. Use run_sample.py to generate "
            "text or run_eval.py to score held-out text."
        )
    if requested["do_train"] is None and requested["do_eval"] is None:
        training_args.do_train = training_args.do_eval = True
    elif requested["do_train"] is None:
        training_args.do_train = not requested["do_eval"]

    if requested["do_eval"] is False:
        strategy_given = any(flag.split("=")[0] == "--eval_strategy" for flag in argv)
        if strategy_given and training_args.eval_strategy != IntervalStrategy.NO:
            raise ValueError(
                f"--do_eval False conflicts with --eval_strategy {training_args.eval_strategy.value}, which "
                "evaluates during training. Drop one of the two."
            )
        training_args.eval_strategy = IntervalStrategy.NO
        training_args.do_eval = False

    if not (training_args.do_train or training_args.do_eval):
        raise ValueError(
            "Nothing to run: training and evaluation are both off. Remove --do_train False to train, or pass "
            "--do_eval to evaluate."
        )


# `record` makes torchrun's failure summary name the failed rank together with its exception and traceback.
@record
def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    model_args, data_args, training_args, run_args = parse_arguments(parser, argv)
    if run_args.distributed and maybe_relaunch_distributed(argv, run_args.nproc_per_node):
        return None

    choose_steps(training_args, argv)
    apply_short_flags(training_args, run_args)
    setup_logging(training_args)
    logger.info(f"Training arguments: {training_args}")

    # Everything that can fail on user input is checked before data is tokenized or a model is built.
    last_checkpoint = find_checkpoint_to_resume(training_args, run_args)
    check_output_dir(training_args, run_args, last_checkpoint)
    tokenizer = load_tokenizer(model_args.hf_tokenizer)
    # Seed before building the model: torch 2.13 seeds its default generator randomly in each new process, so the
    # initial weights would otherwise differ from run to run.
    set_seed(training_args.seed)
    model = build_model(model_args, data_args, tokenizer)
    if not training_args.do_train and model_args.model_name_or_path is None:
        logger.warning(
            "Training is off and no --model_name_or_path was given, so this evaluates a freshly initialized model. "
            "Pass --model_name_or_path to evaluate a trained one."
        )
    if data_args.max_seq_length > model.config.max_position_embeddings:
        raise ValueError(
            f"--max_seq_length {data_args.max_seq_length} exceeds the model's max_position_embeddings="
            f"{model.config.max_position_embeddings}. Lower it or pass --max_position_embeddings."
        )
    raw = load_raw_datasets(
        data_file=data_args.data_file, validation_file=data_args.validation_file,
        hf_raw_repo=data_args.hf_raw_repo, hf_raw_split=data_args.hf_raw_split,
        text_column=data_args.hf_text_column, txt_sample_by=data_args.txt_sample_by,
        validation_split_percentage=data_args.validation_split_percentage, seed=training_args.seed,
    )

    with training_args.main_process_first(desc="tokenizing and packing"):
        packed = tokenize_and_pack(
            raw, tokenizer, data_args.hf_text_column, data_args.max_seq_length,
            num_proc=data_args.preprocessing_num_workers, overwrite_cache=data_args.overwrite_cache,
        )
    train_dataset, eval_dataset = packed["train"], packed["validation"]
    if data_args.max_train_samples is not None:
        train_dataset = train_dataset.select(range(min(len(train_dataset), data_args.max_train_samples)))
    if data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(len(eval_dataset), data_args.max_eval_samples)))
    num_parameters = sum(p.numel() for p in model.parameters())
    logger.info(
        f"Model: {num_parameters / 1e6:.2f}M parameters; {len(train_dataset)} training and {len(eval_dataset)} "
        f"validation blocks of {data_args.max_seq_length} tokens."
    )

    collator = DataCollatorForMaskedDiffusion(
        mask_token_id=model.config.mask_token_id, eod_token_id=model.config.eod_token_id,
        pad_token_id=model.config.pad_token_id, noise_eps=model.config.noise_eps,
        sampling_eps=model.config.sampling_eps, noise_eod=data_args.noise_eod, seed=training_args.seed,
    )
    trainer = MdlmTrainer(
        model=model, args=training_args, data_collator=collator, processing_class=tokenizer,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        eval_seed=data_args.eval_seed,
    )

    metrics = {}
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=last_checkpoint)
        trainer.save_model()
        metrics.update(result.metrics)
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        metrics.update(eval_metrics)
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)

    if trainer.is_world_process_zero():
        plot = plot_training_curves(trainer.state.log_history, Path(training_args.output_dir) / "training_curves.png")
        card = {"tags": ["mdlm", "masked-diffusion", "text-generation"], "model_name": Path(training_args.output_dir).name}
        if data_args.hf_raw_repo is not None:
            card["dataset"] = data_args.hf_raw_repo
        trainer.create_model_card(**card)
        print(json.dumps(metrics, indent=2, sort_keys=True))
        if training_args.do_train:
            print(f"Model, tokenizer and code saved to {os.path.abspath(training_args.output_dir)}")
        else:
            print(f"Metrics saved to {os.path.abspath(training_args.output_dir)}")
        if plot is not None:
            print(f"Training curves: {os.path.abspath(plot)}")
    if training_args.push_to_hub:
        trainer.push_to_hub()
    return metrics


if __name__ == "__main__":
    main()
