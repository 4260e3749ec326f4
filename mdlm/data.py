"""Loading, tokenizing and packing text for MDLM, and the tokenizer's special tokens.

Text comes from one of three places: the default corpus that ships inside the package (the King James Bible, one
chapter per document), a local file (`.txt`, `.json`, `.jsonl`, `.csv`, `.parquet`), or a dataset on the Hub or in
a local folder. Documents are tokenized with `datasets.map`, each followed by the end-of-document token, and packed
into blocks of `max_seq_length + 1` ids, the layout that the collator expects.
"""

import os
from itertools import chain
from pathlib import Path

from datasets import DatasetDict, load_dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.utils import logging


logger = logging.get_logger(__name__)

RESOURCES = Path(__file__).resolve().parent / "resources"
DEFAULT_CORPUS_DIR = RESOURCES / "default_corpus"
DEFAULT_TOKENIZER_DIR = RESOURCES / "tokenizer"

FILE_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
TXT_SAMPLE_BY = {"paragraph": "paragraph", "line": "line", "document": "document"}
MASK_TOKEN = "[MASK]"
EOD_TOKEN = "<|endoftext|>"
PAD_TOKEN = "[PAD]"


def looks_like_local_path(name: str) -> bool:
    """True when `name` cannot be a Hub id: it starts like a path, or has more than one `/`."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def check_data_file(path: str, argument: str = "--data_file") -> Path:
    """Raise a clear error for a missing, empty or unsupported data file, before any heavy work."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"{argument} {path} not found. Pass the path of an existing file.")
    if file.stat().st_size == 0:
        raise ValueError(f"{argument} {path} is empty. Pass a file that contains text.")
    if file.suffix.lower() not in FILE_BUILDERS:
        raise ValueError(
            f"{argument} {path} has an unsupported extension {file.suffix!r}. "
            f"Supported: {', '.join(sorted(FILE_BUILDERS))}."
        )
    return file


def load_tokenizer(name_or_path: str | None) -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it has mask, end-of-document and pad tokens.

    `None` loads the BPE tokenizer that ships with the package. A tokenizer without a mask token gets `[MASK]`
    added; its EOS token serves as end of document (`<|endoftext|>` is added when it has none); a tokenizer
    without a pad token gets `[PAD]`.
    """
    if name_or_path is None:
        name_or_path = str(DEFAULT_TOKENIZER_DIR)
    elif looks_like_local_path(name_or_path) and not Path(name_or_path).expanduser().is_dir():
        raise FileNotFoundError(
            f"Tokenizer folder {name_or_path} not found. Pass an existing folder saved with "
            "`save_pretrained`, or a Hub name such as `gpt2`."
        )
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)

    added = {}
    if tokenizer.mask_token is None:
        added["mask_token"] = MASK_TOKEN
    if tokenizer.eos_token is None:
        added["eos_token"] = EOD_TOKEN
    if tokenizer.pad_token is None:
        added["pad_token"] = PAD_TOKEN
    if added:
        logger.info(f"Adding special tokens to the tokenizer: {added}")
        tokenizer.add_special_tokens(added)
    return tokenizer


def load_raw_datasets(
    data_file: str | None = None,
    validation_file: str | None = None,
    hf_raw_repo: str | None = None,
    hf_raw_split: str | None = None,
    text_column: str = "text",
    txt_sample_by: str = "paragraph",
    validation_split_percentage: float = 5.0,
    seed: int = 42,
    cache_dir: str | None = None,
) -> DatasetDict:
    """Load `train` and `validation` splits of raw text from a file, a dataset, or the default corpus.

    `hf_raw_split` is the dataset's configuration name, as in `Salesforce/wikitext` with `wikitext-103-v1`. When the
    source has no validation split, `validation_split_percentage` percent of the training documents are held out.
    """
    if data_file is not None and hf_raw_repo is not None:
        raise ValueError("Pass either --data_file or --hf_raw_repo, not both.")
    if txt_sample_by not in TXT_SAMPLE_BY:
        raise ValueError(f"Invalid txt_sample_by={txt_sample_by!r}: use one of {', '.join(TXT_SAMPLE_BY)}.")

    if data_file is not None:
        files = {"train": str(check_data_file(data_file))}
        if validation_file is not None:
            files["validation"] = str(check_data_file(validation_file, "--validation_file"))
        raw = load_local_files(files, txt_sample_by, cache_dir)
    elif hf_raw_repo is not None:
        if looks_like_local_path(hf_raw_repo) and not Path(hf_raw_repo).expanduser().exists():
            raise FileNotFoundError(f"Dataset folder {hf_raw_repo} not found. Pass an existing folder or a Hub name.")
        raw = load_dataset(hf_raw_repo, hf_raw_split, cache_dir=cache_dir)
        if validation_file is not None:
            raw["validation"] = load_local_files(
                {"validation": str(check_data_file(validation_file, "--validation_file"))}, txt_sample_by, cache_dir
            )["validation"]
    else:
        files = {"train": str(DEFAULT_CORPUS_DIR / "train.txt.gz")}
        files["validation"] = (
            str(check_data_file(validation_file, "--validation_file"))
            if validation_file is not None
            else str(DEFAULT_CORPUS_DIR / "validation.txt.gz")
        )
        raw = load_local_files(files, "paragraph", cache_dir)

    if "train" not in raw:
        raise ValueError(f"The dataset has no 'train' split; its splits are: {', '.join(raw)}.")
    for split, dataset in raw.items():
        if text_column not in dataset.column_names:
            raise ValueError(
                f"Text column {text_column!r} not found in the {split} split. Its columns are: "
                f"{', '.join(dataset.column_names)}. Pass one of them with --hf_text_column."
            )
        if len(dataset) == 0:
            raise ValueError(f"The {split} split has no documents. Check the data source.")

    if "validation" not in raw:
        if not 0 < validation_split_percentage < 100:
            raise ValueError(
                f"The data has no validation split and validation_split_percentage={validation_split_percentage} "
                "cannot hold one out. Pass a value in (0, 100) or a --validation_file."
            )
        held_out = raw["train"].train_test_split(test_size=validation_split_percentage / 100, seed=seed)
        raw = DatasetDict(train=held_out["train"], validation=held_out["test"])
        logger.info(f"Held out {validation_split_percentage}% of the training documents for validation.")
    return DatasetDict(train=raw["train"], validation=raw["validation"])


def load_local_files(files: dict[str, str], txt_sample_by: str, cache_dir: str | None) -> DatasetDict:
    """Load local files with the `datasets` builder their extension names (gzip is read transparently)."""
    suffixes = {Path(f.removesuffix(".gz")).suffix.lower() for f in files.values()}
    builders = {FILE_BUILDERS[s] for s in suffixes}
    if len(builders) != 1:
        raise ValueError(f"Training and validation files must have the same format; got {', '.join(files.values())}.")
    builder = builders.pop()
    kwargs = {"sample_by": TXT_SAMPLE_BY[txt_sample_by]} if builder == "text" else {}
    return load_dataset(builder, data_files=files, cache_dir=cache_dir, **kwargs)


def tokenize_and_pack(
    raw: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    text_column: str,
    max_seq_length: int,
    num_proc: int | None = None,
    overwrite_cache: bool = False,
) -> DatasetDict:
    """Tokenize every document, append the end-of-document token, and pack into blocks of `max_seq_length + 1`.

    Empty documents are skipped. The remainder after the last full block is dropped. Raises `ValueError` when a
    split has too little text for a single block.
    """
    eod_id = tokenizer.eos_token_id
    block_size = max_seq_length + 1

    def tokenize(batch):
        texts = [text for text in batch[text_column] if isinstance(text, str) and text.strip()]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
        return {"input_ids": [ids + [eod_id] for ids in encoded]}

    def pack(batch):
        stream = list(chain.from_iterable(batch["input_ids"]))
        usable = len(stream) // block_size * block_size
        return {"input_ids": [stream[i : i + block_size] for i in range(0, usable, block_size)]}

    tokenized = raw.map(
        tokenize, batched=True, num_proc=num_proc, remove_columns=raw["train"].column_names,
        load_from_cache_file=not overwrite_cache, desc="Tokenizing",
    )
    packed = tokenized.map(
        pack, batched=True, batch_size=1000, num_proc=num_proc,
        load_from_cache_file=not overwrite_cache, desc=f"Packing into blocks of {block_size}",
    )
    for split, dataset in packed.items():
        if len(dataset) == 0:
            raise ValueError(
                f"The {split} split yields no block of {block_size} tokens ({max_seq_length} + 1). "
                "Pass more text or a smaller --max_seq_length."
            )
    return packed


__all__ = ["DEFAULT_CORPUS_DIR", "DEFAULT_TOKENIZER_DIR", "load_raw_datasets", "load_tokenizer", "tokenize_and_pack"]
