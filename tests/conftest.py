"""Shared fixtures: tiny configs and models, the shared KJV corpus, and a locally trained tokenizer."""

from pathlib import Path

import pytest
import torch

from mdlm import MdlmConfig, MdlmForMaskedDiffusion


REPO_ROOT = Path(__file__).resolve().parent.parent
KJV_DIR = REPO_ROOT.parent / "shared" / "data" / "kjv"

VOCAB_SIZE = 64
MASK_ID = 60
EOD_ID = 1
PAD_ID = 2


def tiny_config(**overrides) -> MdlmConfig:
    settings = dict(
        vocab_size=VOCAB_SIZE, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, mask_token_id=MASK_ID, eod_token_id=EOD_ID, pad_token_id=PAD_ID,
        tokenizer_vocab_size=MASK_ID + 1,
    )
    settings.update(overrides)
    return MdlmConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> MdlmForMaskedDiffusion:
    torch.manual_seed(seed)
    return MdlmForMaskedDiffusion(tiny_config(**overrides))


def random_tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Token ids that are neither special (mask, EOD, pad) nor padded-vocabulary ids."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, MASK_ID, (batch, length), generator=generator)


@pytest.fixture(scope="session")
def kjv_dir() -> Path:
    if not (KJV_DIR / "train.txt").is_file():
        pytest.fail(f"The shared KJV corpus is missing at {KJV_DIR}; tests that train on real text need it.")
    return KJV_DIR


@pytest.fixture(scope="session")
def local_tokenizer_dir(tmp_path_factory, kjv_dir) -> Path:
    """A small byte-level BPE trained here on KJV text, saved with no mask token, like a causal-LM tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = (kjv_dir / "validation.txt").read_text()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(text.split("\n\n"), trainer=trainer)
    folder = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(folder)
    return folder
