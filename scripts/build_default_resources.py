"""Build the default corpus and tokenizer that ship inside the package.

Usage: python scripts/build_default_resources.py --source PATH/TO/kjv

The source folder holds `train.txt` and `validation.txt`, documents separated by a blank line. The script copies
them gzipped to `mdlm/resources/default_corpus/` and trains a byte-level BPE tokenizer on the training text, saved
to `mdlm/resources/tokenizer/` with `<|endoftext|>` (end of document), `[MASK]` and `[PAD]` as special tokens.
"""

import argparse
import gzip
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast


RESOURCES = Path(__file__).resolve().parent.parent / "mdlm" / "resources"
SPECIAL_TOKENS = ["<|endoftext|>", "[MASK]", "[PAD]"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="Folder with train.txt and validation.txt.")
    parser.add_argument("--vocab_size", type=int, default=4096, help="BPE vocabulary size, special tokens included.")
    args = parser.parse_args()

    corpus_dir = RESOURCES / "default_corpus"
    corpus_dir.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation"):
        source = args.source / f"{split}.txt"
        if not source.is_file():
            raise FileNotFoundError(f"Source file {source} not found.")
        # mtime=0 keeps the archive byte-identical across rebuilds.
        with open(source, "rb") as src, open(corpus_dir / f"{split}.txt.gz", "wb") as raw:
            with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as dst:
                shutil.copyfileobj(src, dst)

    documents = [d.strip() for d in (args.source / "train.txt").read_text().split("\n\n") if d.strip()]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(documents, trainer=trainer)

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|endoftext|>",
        mask_token="[MASK]",
        pad_token="[PAD]",
        model_max_length=1024,
    )
    wrapped.save_pretrained(RESOURCES / "tokenizer")
    print(f"Saved {len(documents)} training documents and a {len(wrapped)}-token tokenizer under {RESOURCES}")


if __name__ == "__main__":
    main()
