"""Command-line arguments of the mdlm scripts, as dataclasses for `transformers.HfArgumentParser`.

The seed's short flags are aliases of the HF names: `--d_model` for `--hidden_size`, `--n_layers`, `--n_heads`,
`--d_ff`, and `--epochs` and `--batch_size` for the Trainer's `--num_train_epochs` and per-device batch sizes.
"""

import sys
from dataclasses import dataclass, field, fields


@dataclass
class ModelArguments:
    """Which model to train: a new one of the given shape, or an existing checkpoint."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Checkpoint folder or Hub name of an MDLM to continue training. Default: a new model."},
    )
    hidden_size: int = field(default=256, metadata={"aliases": ["--d_model"], "help": "Model width. Default 256."})
    num_hidden_layers: int = field(
        default=4, metadata={"aliases": ["--n_layers"], "help": "Number of transformer blocks. Default 4."}
    )
    num_attention_heads: int = field(
        default=4, metadata={"aliases": ["--n_heads"], "help": "Attention heads; must divide the width. Default 4."}
    )
    intermediate_size: int | None = field(
        default=None,
        metadata={
            "aliases": ["--d_ff"],
            "help": "SwiGLU width. Default (or `None`): floor(8 * width / (3 * 64)) * 64.",
        },
    )
    use_rope: bool = field(
        default=True,
        metadata={"help": "Rotary position embeddings (default). `--use_rope False` uses learned absolute ones."},
    )
    rope_theta: float = field(default=10000.0, metadata={"help": "Base of the rotary frequencies. Default 10000."})
    rope_percent: float = field(
        default=1.0, metadata={"help": "Fraction of each head's dimensions that rotate, in (0, 1]. Default 1.0."}
    )
    max_position_embeddings: int | None = field(
        default=None, metadata={"help": "Longest sequence the model accepts. Default: --max_seq_length."}
    )
    hidden_dropout: float = field(default=0.0, metadata={"help": "Dropout on block outputs. Default 0."})
    attention_dropout: float = field(default=0.0, metadata={"help": "Dropout on attention weights. Default 0."})
    document_attention: bool = field(
        default=False,
        metadata={
            "help": "Restrict attention to each document inside a packed block and restart positions at 0 after each "
            "end-of-document token. Default False."
        },
    )
    pad_vocab_to_multiple_of: int = field(
        default=64,
        metadata={"help": "Round the embedding table up to this multiple; padded ids are never predicted. Default 64."},
    )
    hf_tokenizer: str | None = field(
        default=None,
        metadata={"help": "Tokenizer folder or Hub name. Default: the BPE tokenizer that ships with mdlm."},
    )


@dataclass
class DataArguments:
    """Where the text comes from and how it is cut into blocks."""

    data_file: str | None = field(
        default=None,
        metadata={"help": "Training text: .txt, .json, .jsonl, .csv or .parquet. Default: the embedded corpus."},
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Validation text in the same format as --data_file."}
    )
    hf_raw_repo: str | None = field(
        default=None, metadata={"help": "Dataset on the Hub (e.g. Salesforce/wikitext) or a local dataset folder."}
    )
    hf_raw_split: str | None = field(
        default=None, metadata={"help": "Dataset configuration name, e.g. wikitext-103-v1."}
    )
    hf_text_column: str = field(default="text", metadata={"help": "Column that holds the text. Default `text`."})
    txt_sample_by: str = field(
        default="paragraph",
        metadata={
            "help": "How a .txt file splits into documents: `paragraph` (blank line, default), `line` or `document`."
        },
    )
    max_seq_length: int = field(
        default=128,
        metadata={"help": "Tokens the model sees per example; blocks of this + 1 are packed. Default 128."},
    )
    validation_split_percentage: float = field(
        default=5.0,
        metadata={"help": "Percent of training documents held out when the data has no validation split. Default 5."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training blocks."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many validation blocks."})
    preprocessing_num_workers: int | None = field(
        default=None, metadata={"help": "Processes for tokenizing with datasets.map. Default: one."}
    )
    overwrite_cache: bool = field(default=False, metadata={"help": "Ignore the datasets cache of tokenized data."})
    noise_eod: bool = field(
        default=False,
        metadata={"help": "Mask end-of-document tokens like others (they still never count in the loss)."},
    )
    eval_seed: int = field(default=0, metadata={"help": "Seed of the evaluation noise, for reproducible eval loss."})


@dataclass
class RunArguments:
    """Short flags and run control that the Trainer's arguments do not cover."""

    epochs: float | None = field(default=None, metadata={"help": "Alias of --num_train_epochs."})
    batch_size: int | None = field(
        default=None, metadata={"help": "Alias setting both per-device train and eval batch sizes."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start over in an output folder that holds checkpoints instead of resuming from the last."},
    )
    distributed: bool = field(
        default=False,
        metadata={"help": "Relaunch under torch.distributed.run with one process per GPU (or CPU process)."},
    )
    nproc_per_node: int | None = field(
        default=None, metadata={"help": "Processes for --distributed. Default: visible GPUs, else 2 CPU processes."}
    )


NONE_STRINGS = {"None", "none", "null"}


def drop_none_values(argv: list[str], parser_actions) -> list[str]:
    """Remove `--flag None` pairs for optional fields, so `--d_ff None` means the default `None`.

    argparse would otherwise try `int("None")`.
    """
    optional_flags = {
        option
        for action in parser_actions
        if action.default is None
        for option in action.option_strings
    }
    cleaned, i = [], 0
    while i < len(argv):
        if argv[i] in optional_flags and i + 1 < len(argv) and argv[i + 1] in NONE_STRINGS:
            i += 2
            continue
        cleaned.append(argv[i])
        i += 1
    return cleaned


def parse_arguments(parser, argv: list[str] | None = None):
    """Parse `argv` (default: the command line) with `parser`, accepting `None` for optional values."""
    argv = sys.argv[1:] if argv is None else argv
    return parser.parse_args_into_dataclasses(args=drop_none_values(argv, parser._actions))


def dataclass_flags(cls) -> set[str]:
    return {f.name for f in fields(cls)}
