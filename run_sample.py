#!/usr/bin/env python
"""Sample text from a trained Masked Diffusion Language Model (MDLM).

    python run_sample.py --model_name_or_path outputs/mdlm --num_samples 4 --num_steps 128 --seq_len 128

The checkpoint folder (or Hub name) must hold the model and its tokenizer, as `run_mdlm.py` saves them. The model
loads with `trust_remote_code=True`, so a checkpoint saved by mdlm works without mdlm installed. `--show_steps`
prints the partly decoded text every few denoising steps, with masks shown as the tokenizer's mask token, and
`--output_file samples.jsonl` writes one JSON object per sample. Run `python run_sample.py --help` for every option.
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field

import torch
import transformers
from transformers import AutoModelForMaskedLM, AutoTokenizer, HfArgumentParser


logger = logging.getLogger(__name__)

SAMPLERS = ("ddpm", "ddpm_cache", "confidence")

# With --show_steps and no --show_every, a snapshot is taken this many times per context window.
DEFAULT_SNAPSHOTS_PER_WINDOW = 8

# Shown for masked positions when the tokenizer defines no mask token.
FALLBACK_MASK_TEXT = "[MASK]"


@dataclass
class SampleArguments:
    """Arguments of run_sample.py: the checkpoint, the sampling settings and the output file."""

    model_name_or_path: str = field(
        metadata={"help": "Checkpoint folder written by save_pretrained, or a Hub model id. Required."}
    )
    num_samples: int = field(default=4, metadata={"help": "Number of sequences to generate. Default 4."})
    batch_size: int | None = field(
        default=None, metadata={"help": "Sequences per generate call. Default: all --num_samples at once."}
    )
    num_steps: int = field(default=128, metadata={"help": "Denoising steps per context window. Default 128."})
    sampler: str = field(
        default="ddpm_cache",
        metadata={
            "choices": list(SAMPLERS),
            "help": "ddpm (MDLM ancestral), ddpm_cache (same output, fewer forward passes) or confidence "
            "(most confident positions first). Default ddpm_cache.",
        },
    )
    seq_len: int | None = field(
        default=None,
        metadata={
            "help": "Length of each sample in tokens, prompt included. Longer than the model's context means "
            "semi-autoregressive generation. Default: the model's max_position_embeddings."
        },
    )
    prompt: str | None = field(
        default=None,
        metadata={"help": "Text every sample starts with, tokenized without special tokens. Default: none."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the sampling generator. Default 0."})
    temperature: float = field(
        default=1.0, metadata={"help": "Sampling temperature; 0 takes the most likely token. Default 1.0."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass in (0, 1]; 1 disables it. Default 1.0."})
    confidence_threshold: float | None = field(
        default=None,
        metadata={
            "help": "With --sampler confidence: also unmask, per step, every position whose probability exceeds "
            "this value. Default none."
        },
    )
    block_length: int | None = field(
        default=None,
        metadata={"help": "Decode each window in left-to-right blocks of this many tokens. Default: the whole window."},
    )
    stride_length: int | None = field(
        default=None,
        metadata={"help": "New tokens per window beyond the model's context, in tokens. Default: half the context."},
    )
    final_denoise: bool = field(
        default=True,
        metadata={"help": "Fill every position still masked after the last step with its most likely token. "
                  "`--no_final_denoise` turns it off. Default on."},
    )
    stop_at_eod: bool = field(
        default=False, metadata={"help": "Cut each sample before its first end-of-document token. Default off."}
    )
    output_file: str | None = field(
        default=None,
        metadata={"help": "JSONL file to write, one object per sample with text and token_ids. Default: none."},
    )
    show_steps: bool = field(
        default=False,
        metadata={"help": "Print the partly decoded text every few steps and save it as `trajectory`. Default off."},
    )
    show_every: int | None = field(
        default=None,
        metadata={
            "help": f"With --show_steps, snapshot every this many steps. Default: --num_steps / "
            f"{DEFAULT_SNAPSHOTS_PER_WINDOW}."
        },
    )
    progress_bar: bool = field(
        default=True, metadata={"help": "Show a progress bar over denoising steps; `--no_progress_bar` hides it."}
    )
    device: str | None = field(
        default=None, metadata={"help": "Torch device such as cpu or cuda:0. Default: cuda when available, else cpu."}
    )


def check_checkpoint_path(path: str) -> None:
    """Raise FileNotFoundError when `path` names a local folder that does not exist.

    A value that is not an existing folder counts as local when it is absolute, starts with `.` or `~`, or contains
    more than one `/`. Anything else is left to `from_pretrained` as a Hub model id.
    """
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise FileNotFoundError(
            f"{path!r} is a file, not a checkpoint folder. Pass the folder that contains config.json."
        )
    looks_local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1
    if looks_local:
        raise FileNotFoundError(
            f"Checkpoint folder not found: {path!r}. Pass a folder written by save_pretrained (with config.json "
            "and the tokenizer files), or a Hub model id such as 'org/name'."
        )


def decode_with_masks(tokenizer, token_ids: list[int], mask_token_id: int) -> str:
    """Decode `token_ids`, showing each mask position as the tokenizer's mask token string."""
    mask_text = tokenizer.mask_token or FALLBACK_MASK_TEXT
    pieces, run = [], []
    for token_id in token_ids:
        if token_id != mask_token_id:
            run.append(token_id)
            continue
        if run:
            pieces.append(tokenizer.decode(run))
            run = []
        pieces.append(mask_text)
    if run:
        pieces.append(tokenizer.decode(run))
    return "".join(pieces)


class StepPrinter:
    """Callback for `generate` that prints and keeps partly decoded snapshots of every sample."""

    def __init__(self, tokenizer, mask_token_id: int, show_every: int, first_sample_index: int):
        self.tokenizer = tokenizer
        self.mask_token_id = mask_token_id
        self.show_every = show_every
        self.first_sample_index = first_sample_index
        self.snapshots = None

    def __call__(self, state) -> None:
        last_step = state.step == state.num_steps
        if not (state.is_final_denoise or last_step or state.step % self.show_every == 0):
            return
        sequences = state.sequences.tolist()
        if self.snapshots is None:
            self.snapshots = [[] for _ in sequences]
        label = "final denoise" if state.is_final_denoise else f"step {state.step}/{state.num_steps}"
        for row, token_ids in enumerate(sequences):
            text = decode_with_masks(self.tokenizer, token_ids, self.mask_token_id)
            snapshot = {
                "window": state.window_index, "step": state.step, "final_denoise": state.is_final_denoise, "text": text
            }
            self.snapshots[row].append(snapshot)
            print(f"[sample {self.first_sample_index + row}, window {state.window_index}, {label}] {text}")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = HfArgumentParser(SampleArguments)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO
    )
    transformers.utils.logging.set_verbosity_warning()

    check_checkpoint_path(args.model_name_or_path)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # The tokenizer reads config.json to learn the model type, which only the checkpoint's own code defines.
    tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, trust_remote_code=True)
    model = AutoModelForMaskedLM.from_pretrained(args.model_name_or_path, trust_remote_code=True).to(device)
    model.eval()
    mask_token_id = model.config.mask_token_id
    logger.info(f"Loaded {args.model_name_or_path} on {device}; sampler {args.sampler}, {args.num_steps} steps.")

    prompt_ids = None
    if args.prompt:
        prompt_ids = torch.tensor(tokenizer(args.prompt, add_special_tokens=False)["input_ids"], dtype=torch.long)
    show_every = args.show_every or max(1, args.num_steps // DEFAULT_SNAPSHOTS_PER_WINDOW)
    generator = torch.Generator().manual_seed(args.seed)
    batch_size = args.batch_size or args.num_samples

    records = []
    for first in range(0, args.num_samples, batch_size):
        num_in_batch = min(batch_size, args.num_samples - first)
        printer = StepPrinter(tokenizer, mask_token_id, show_every, first) if args.show_steps else None
        output = model.generate(
            num_samples=num_in_batch, seq_len=args.seq_len, num_steps=args.num_steps, sampler=args.sampler,
            temperature=args.temperature, top_p=args.top_p, generator=generator, prompt_ids=prompt_ids,
            final_denoise=args.final_denoise, stop_at_eod=args.stop_at_eod,
            confidence_threshold=args.confidence_threshold, block_length=args.block_length,
            stride_length=args.stride_length, return_dict_in_generate=True, callback=printer,
            show_progress=args.progress_bar,
        )
        for row, token_ids in enumerate(output.sequences):
            token_ids = token_ids.tolist()
            record = {
                "text": decode_with_masks(tokenizer, token_ids, mask_token_id),
                "token_ids": token_ids,
                "prompt": args.prompt,
                "sampler": args.sampler,
                "num_steps": args.num_steps,
                "seed": args.seed,
                "temperature": args.temperature,
                "top_p": args.top_p,
                "num_forward_passes_in_batch": output.num_forward_passes,
            }
            if printer is not None and printer.snapshots is not None:
                record["trajectory"] = printer.snapshots[row]
            records.append(record)

    for index, record in enumerate(records):
        print(f"=== sample {index} ===\n{record['text']}")
    if args.output_file:
        write_jsonl(records, args.output_file)
        logger.info(f"Wrote {len(records)} samples to {args.output_file}")
    return records


def write_jsonl(records: list[dict], path: str) -> None:
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:
        logger.error(str(error))
        sys.exit(1)
