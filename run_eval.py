#!/usr/bin/env python
"""Evaluate a trained Masked Diffusion Language Model (MDLM).

Two evaluations, together or apart:

- The perplexity bound: the NELBO per token of held-out text, averaged over `--eval_mc_samples` draws of the
  diffusion time and masks per sequence, with its standard error. `exp` of it bounds the perplexity from above.

      python run_eval.py --model_name_or_path outputs/mdlm --data_file test.txt --eval_mc_samples 8

- Generative evaluation, with `--gen_ppl_model`: sample from the model, then report the perplexity of the samples
  under that causal LM, their unigram entropy, and the forward passes and seconds per sample.

      python run_eval.py --model_name_or_path outputs/mdlm --skip_bound --gen_ppl_model gpt2 \\
          --num_samples 16 --num_steps 1000 --sampler ddpm_cache --seq_len 128

The data options are those of `run_mdlm.py`. A `--data_file` is evaluated whole. Without data options the
validation split of the corpus that ships with mdlm is evaluated. The results are printed as JSON and written to
`--output_file` when given. Run `python run_eval.py --help` for every option.
"""

import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from datasets import DatasetDict, load_dataset
from transformers import AutoModelForMaskedLM, AutoTokenizer, HfArgumentParser

from mdlm.arguments import DataArguments, parse_arguments
from mdlm.collator import DataCollatorForMaskedDiffusion
from mdlm.data import DEFAULT_CORPUS_DIR, check_data_file, load_local_files, looks_like_local_path, tokenize_and_pack
from mdlm.evaluation import (
    causal_lm_perplexity, load_causal_lm, perplexity_bound, samples_to_texts, unigram_entropy,
)
from mdlm.generation_mdlm import SAMPLERS


logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")

# Help of the shared data options, reworded for evaluation, because the dataclass's own help speaks of training.
DATA_HELP = {
    "data_file": "Text to evaluate, whole: .txt, .json, .jsonl, .csv or .parquet. Default: mdlm's corpus.",
    "validation_file": "Text that --split validation evaluates, in a format that --data_file accepts.",
    "max_eval_samples": "Evaluate only the first this many blocks. Default: all.",
    "max_train_samples": "Not used by run_eval.py.",
    "validation_split_percentage": "Not used by run_eval.py, which never holds out part of a file.",
}


@dataclass
class EvalArguments:
    """The model, the perplexity bound's settings and the output file."""

    model_name_or_path: str = field(
        metadata={"help": "MDLM checkpoint folder with its tokenizer, or a Hub model id. Required."}
    )
    split: str | None = field(
        default=None,
        metadata={
            "choices": list(SPLITS),
            "help": "Split to evaluate: train, validation or test. Default: the whole --data_file, else validation. "
            "With --data_file, `validation` means --validation_file.",
        },
    )
    eval_mc_samples: int = field(
        default=4, metadata={"help": "Draws of the diffusion time and masks per sequence. Default 4."}
    )
    seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the evaluation noise and of sampling. Default: --eval_seed, which defaults to 0."},
    )
    batch_size: int = field(
        default=32, metadata={"help": "Rows per forward pass for the bound (sequences x draws). Default 32."}
    )
    skip_bound: bool = field(default=False, metadata={"help": "Skip the perplexity bound. Default off."})
    device: str | None = field(
        default=None, metadata={"help": "Torch device such as cpu or cuda:0. Default: cuda when available, else cpu."}
    )
    output_file: str | None = field(default=None, metadata={"help": "JSON file to write the results to."})


@dataclass
class GenerativeArguments:
    """Sampling settings and the causal LM that scores the samples."""

    gen_ppl_model: str | None = field(
        default=None,
        metadata={
            "help": "Causal LM folder or Hub name that scores samples. Setting it runs the generative evaluation."
        },
    )
    num_samples: int = field(default=16, metadata={"help": "Samples to generate. Default 16."})
    num_steps: int = field(default=128, metadata={"help": "Denoising steps per context window. Default 128."})
    sampler: str = field(
        default="ddpm_cache",
        metadata={"choices": list(SAMPLERS), "help": "ddpm, ddpm_cache or confidence. Default ddpm_cache."},
    )
    seq_len: int | None = field(
        default=None,
        metadata={"help": "Sample length in MDLM tokens. Default: the model's max_position_embeddings."},
    )
    sampling_batch_size: int | None = field(
        default=None, metadata={"help": "Samples per generate call. Default: all --num_samples at once."}
    )
    gen_ppl_batch_size: int = field(default=8, metadata={"help": "Windows per causal LM forward pass. Default 8."})
    gen_ppl_stride: int | None = field(
        default=None,
        metadata={"help": "Tokens scored per sliding window for samples longer than the causal LM's context. "
                  "Default: half its context."},
    )
    samples_file: str | None = field(
        default=None, metadata={"help": "JSONL file to write the samples to, one object per sample. Default: none."}
    )


def resolve_text_source(data_args: DataArguments, split: str | None) -> dict:
    """Return where the text to evaluate comes from, `{"file": path}` or `{"repo", "config", "split"}`.

    Raises a ValueError or FileNotFoundError for a split that the data options cannot provide.
    """
    if data_args.data_file is not None and data_args.hf_raw_repo is not None:
        raise ValueError("Pass either --data_file or --hf_raw_repo, not both.")
    if split == "validation" and data_args.validation_file is not None:
        return {"file": str(check_data_file(data_args.validation_file, "--validation_file"))}

    if data_args.data_file is not None:
        if split in (None, "train"):
            return {"file": str(check_data_file(data_args.data_file))}
        raise ValueError(
            f"--split {split} needs its own file. Pass that file as --data_file (evaluated whole)"
            + (", or as --validation_file with --split validation." if split == "validation" else ".")
        )
    if data_args.hf_raw_repo is not None:
        if looks_like_local_path(data_args.hf_raw_repo) and not Path(data_args.hf_raw_repo).expanduser().exists():
            raise FileNotFoundError(
                f"Dataset folder {data_args.hf_raw_repo} not found. Pass an existing folder or a Hub name."
            )
        return {"repo": data_args.hf_raw_repo, "config": data_args.hf_raw_split, "split": split or "validation"}
    if split == "test":
        raise ValueError("The corpus that ships with mdlm has no test split. Pass a test file with --data_file.")
    return {"file": str(DEFAULT_CORPUS_DIR / f"{split or 'validation'}.txt.gz"), "sample_by": "paragraph"}


def load_evaluation_blocks(source: dict, data_args: DataArguments, tokenizer):
    """Load the text that `source` names and pack it into blocks of `max_seq_length + 1` token ids."""
    if "file" in source:
        sample_by = source.get("sample_by", data_args.txt_sample_by)
        raw = load_local_files({"evaluation": source["file"]}, sample_by, cache_dir=None)["evaluation"]
        name = source["file"]
    else:
        splits = load_dataset(source["repo"], source["config"])
        if source["split"] not in splits:
            raise ValueError(
                f"{source['repo']} has no {source['split']!r} split. Its splits are: {', '.join(splits)}. "
                "Pass one of them with --split."
            )
        raw = splits[source["split"]]
        name = f"{source['repo']} ({source['split']})"
    if data_args.hf_text_column not in raw.column_names:
        raise ValueError(
            f"Text column {data_args.hf_text_column!r} not found in {name}. Its columns are: "
            f"{', '.join(raw.column_names)}. Pass one of them with --hf_text_column."
        )

    try:
        blocks = tokenize_and_pack(
            DatasetDict(train=raw), tokenizer, data_args.hf_text_column, data_args.max_seq_length,
            num_proc=data_args.preprocessing_num_workers, overwrite_cache=data_args.overwrite_cache,
        )["train"]
    except ValueError as error:
        raise ValueError(
            f"{name} yields no block of {data_args.max_seq_length + 1} tokens. Pass more text or a smaller "
            "--max_seq_length."
        ) from error
    if data_args.max_eval_samples is not None:
        blocks = blocks.select(range(min(len(blocks), data_args.max_eval_samples)))
    return blocks


def check_arguments(eval_args: EvalArguments, gen_args: GenerativeArguments, data_args: DataArguments) -> dict | None:
    """Raise on invalid options before anything heavy is loaded, and return the text source of the bound, if any."""
    if eval_args.skip_bound and gen_args.gen_ppl_model is None:
        raise ValueError("--skip_bound without --gen_ppl_model leaves nothing to evaluate. Drop one of them.")
    positive = {
        "--eval_mc_samples": eval_args.eval_mc_samples, "--batch_size": eval_args.batch_size,
        "--max_seq_length": data_args.max_seq_length, "--num_samples": gen_args.num_samples,
        "--num_steps": gen_args.num_steps, "--gen_ppl_batch_size": gen_args.gen_ppl_batch_size,
        "--seq_len": gen_args.seq_len, "--sampling_batch_size": gen_args.sampling_batch_size,
        "--max_eval_samples": data_args.max_eval_samples,
    }
    for flag, value in positive.items():
        if value is not None and value < 1:
            raise ValueError(f"Invalid {flag} {value}: it must be a positive integer.")
    check_model_path(eval_args.model_name_or_path, "--model_name_or_path")
    if gen_args.gen_ppl_model is not None:
        check_model_path(gen_args.gen_ppl_model, "--gen_ppl_model")
    if eval_args.skip_bound:
        return None
    return resolve_text_source(data_args, eval_args.split)


def check_model_path(path: str, flag: str) -> None:
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise FileNotFoundError(f"{flag} {path} is a file. Pass the checkpoint folder that contains config.json.")
    if looks_like_local_path(path):
        raise FileNotFoundError(f"{flag} {path} not found. Pass a folder written by save_pretrained or a Hub id.")


def load_mdlm(eval_args: EvalArguments, data_args: DataArguments, device: torch.device):
    """Load the MDLM and its tokenizer, and check that they agree with each other and with --max_seq_length."""
    tokenizer = AutoTokenizer.from_pretrained(eval_args.model_name_or_path, trust_remote_code=True)
    model = AutoModelForMaskedLM.from_pretrained(eval_args.model_name_or_path, trust_remote_code=True).to(device)
    model.eval()
    config = model.config
    if tokenizer.mask_token_id != config.mask_token_id or tokenizer.eos_token_id != config.eod_token_id:
        raise ValueError(
            f"The tokenizer in {eval_args.model_name_or_path} (mask {tokenizer.mask_token_id}, end of document "
            f"{tokenizer.eos_token_id}) does not match the model (mask {config.mask_token_id}, end of document "
            f"{config.eod_token_id}). Save the tokenizer the model was trained with next to it."
        )
    if not eval_args.skip_bound and data_args.max_seq_length > config.max_position_embeddings:
        raise ValueError(
            f"--max_seq_length {data_args.max_seq_length} exceeds the model's max_position_embeddings="
            f"{config.max_position_embeddings}. Pass a smaller one."
        )
    return model, tokenizer


def evaluate_bound(model, tokenizer, source, eval_args, data_args, seed: int) -> dict:
    blocks = load_evaluation_blocks(source, data_args, tokenizer)
    logger.info(
        f"Perplexity bound on {len(blocks)} blocks of {data_args.max_seq_length} tokens with "
        f"{eval_args.eval_mc_samples} draws each."
    )
    config = model.config
    collator = DataCollatorForMaskedDiffusion(
        mask_token_id=config.mask_token_id, eod_token_id=config.eod_token_id, pad_token_id=config.pad_token_id,
        noise_eps=config.noise_eps, sampling_eps=config.sampling_eps, noise_eod=data_args.noise_eod,
    )
    start = time.perf_counter()
    result = perplexity_bound(
        model, blocks, collator, batch_size=eval_args.batch_size, mc_samples=eval_args.eval_mc_samples, seed=seed
    )
    return {
        **asdict(result), "data": source.get("file") or source, "max_seq_length": data_args.max_seq_length,
        "seconds": round(time.perf_counter() - start, 2),
    }


def generate_samples(model, gen_args: GenerativeArguments, seed: int) -> tuple[list[list[int]], dict]:
    """Sample from the model and return the token ids and the cost: forward passes and seconds per sample."""
    generator = torch.Generator().manual_seed(seed)
    batch_size = gen_args.sampling_batch_size or gen_args.num_samples
    samples, forward_passes, seconds = [], [], 0.0
    for first in range(0, gen_args.num_samples, batch_size):
        start = time.perf_counter()
        output = model.generate(
            num_samples=min(batch_size, gen_args.num_samples - first), seq_len=gen_args.seq_len,
            num_steps=gen_args.num_steps, sampler=gen_args.sampler, generator=generator,
            return_dict_in_generate=True,
        )
        seconds += time.perf_counter() - start
        samples.extend(output.sequences.tolist())
        forward_passes.append(output.num_forward_passes)
    cost = {
        # Each forward pass runs on a whole batch, so this is also the number of model calls each sample took.
        "forward_passes_per_batch": sum(forward_passes) / len(forward_passes),
        "sampling_batch_size": batch_size,
        "seconds_per_sample": seconds / gen_args.num_samples,
        "seconds_total": seconds,
    }
    return samples, cost


def evaluate_samples(model, tokenizer, judge, gen_args: GenerativeArguments, seed: int) -> tuple[dict, list[dict]]:
    samples, cost = generate_samples(model, gen_args, seed)
    texts = samples_to_texts(samples, tokenizer)
    judge_model, judge_tokenizer = judge
    scores = causal_lm_perplexity(
        texts, judge_model, judge_tokenizer, batch_size=gen_args.gen_ppl_batch_size, stride=gen_args.gen_ppl_stride
    )
    result = {
        "sampler": gen_args.sampler, "num_steps": gen_args.num_steps, "num_samples": gen_args.num_samples,
        "seq_len": len(samples[0]), "seed": seed, "gen_ppl_model": gen_args.gen_ppl_model,
        "generative_perplexity": scores.perplexity, "gen_nll_per_token": scores.nll_per_token,
        "gen_nll_standard_error": scores.standard_error,
        "gen_ppl_num_tokens": scores.num_tokens, "gen_ppl_max_length": scores.max_length,
        "gen_ppl_stride": scores.stride, "unigram_entropy_nats": unigram_entropy(samples), **cost,
    }
    records = [{"text": text, "token_ids": ids} for text, ids in zip(texts, samples)]
    return result, records


def write_jsonl(records: list[dict], path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser((EvalArguments, GenerativeArguments, DataArguments))
    for action in parser._actions:
        if action.dest in DATA_HELP:
            action.help = DATA_HELP[action.dest]
    return parser


def main(argv: list[str] | None = None) -> dict:
    parser = build_parser()
    eval_args, gen_args, data_args = parse_arguments(parser, argv)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    transformers.utils.logging.set_verbosity_warning()
    datasets.utils.logging.set_verbosity_warning()

    # Everything that can fail on user input is checked before text is tokenized or samples are drawn.
    source = check_arguments(eval_args, gen_args, data_args)
    seed = eval_args.seed if eval_args.seed is not None else data_args.eval_seed
    device = torch.device(eval_args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tokenizer = load_mdlm(eval_args, data_args, device)
    judge = load_causal_lm(gen_args.gen_ppl_model, device) if gen_args.gen_ppl_model is not None else None

    results = {
        "model_name_or_path": eval_args.model_name_or_path, "device": str(device),
        "torch_num_threads": torch.get_num_threads(),
    }
    if source is not None:
        results["perplexity_bound"] = evaluate_bound(model, tokenizer, source, eval_args, data_args, seed)
    if judge is not None:
        results["generative"], records = evaluate_samples(model, tokenizer, judge, gen_args, seed)
        if gen_args.samples_file:
            write_jsonl(records, gen_args.samples_file)
            logger.info(f"Wrote {len(records)} samples to {gen_args.samples_file}")

    print(json.dumps(results, indent=2))
    if eval_args.output_file:
        Path(eval_args.output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(eval_args.output_file).write_text(json.dumps(results, indent=2) + "\n")
        logger.info(f"Wrote the results to {eval_args.output_file}")
    return results


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        logger.error(str(error))
        sys.exit(1)
