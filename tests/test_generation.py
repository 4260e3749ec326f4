"""Tests of MDLM sampling: the samplers, conditioning, semi-autoregressive windows, remote-code loading and the
`run_sample.py` script. Every model here is tiny and random, and nothing is downloaded."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mdlm import MdlmConfig, MdlmForMaskedDiffusion
from mdlm.generation_mdlm import SAMPLERS, inverse_cdf, plan_windows, sample_categorical


REPO_ROOT = Path(__file__).resolve().parents[1]
VOCAB_SIZE = 40
MASK_ID = 39
EOD_ID = 0
CONTEXT = 32
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run the tiny models on one thread. Several threads only add synchronization to such small matrices, and
    on a machine shared with other jobs they can slow these tests down by orders of magnitude."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_model(initializer_range: float = 0.02, vocab_size: int = VOCAB_SIZE, mask_token_id: int = MASK_ID,
               eod_token_id: int = EOD_ID, pad_token_id: int | None = None) -> MdlmForMaskedDiffusion:
    torch.manual_seed(0)
    config = MdlmConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        mask_token_id=mask_token_id, eod_token_id=eod_token_id, pad_token_id=pad_token_id,
        max_position_embeddings=CONTEXT, initializer_range=initializer_range,
    )
    return MdlmForMaskedDiffusion(config).eval()


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def peaked_model():
    """A model whose predictions are far from uniform, so a sampler that ignores them would be caught."""
    return make_model(initializer_range=1.0)


def mask_position_probs(model) -> torch.Tensor:
    """Return `p_theta(x_0 | x_t)` of a one-token sequence that is masked, in float64."""
    with torch.no_grad():
        return model(torch.tensor([[MASK_ID]])).logits[0, 0].exp().double()


def offline_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, **OFFLINE_ENV, "HF_HOME": str(tmp_path / "hf_home")}


# Determinism and masks


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_seeded_generation_is_deterministic(model, sampler):
    first = model.generate(num_samples=2, seq_len=16, num_steps=8, sampler=sampler, generator=3)
    second = model.generate(num_samples=2, seq_len=16, num_steps=8, sampler=sampler, generator=3)
    assert torch.equal(first, second)


def test_integer_seed_matches_cpu_generator(model):
    from_seed = model.generate(num_samples=2, seq_len=16, num_steps=8, generator=5)
    from_generator = model.generate(num_samples=2, seq_len=16, num_steps=8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(from_seed, from_generator)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_no_mask_token_survives(model, sampler):
    ids = model.generate(num_samples=3, seq_len=24, num_steps=4, sampler=sampler, generator=0)
    assert ids.shape == (3, 24)
    assert not (ids == MASK_ID).any()


def test_without_final_denoise_masks_can_survive(model):
    # One step from t = 1 to t = 0.5 leaves each position masked with probability 1/2.
    ids = model.generate(num_samples=2, seq_len=32, num_steps=1, time_eps=0.5, final_denoise=False, generator=0)
    assert (ids == MASK_ID).any()


def test_generation_restores_training_mode():
    model = make_model()
    model.train()
    model.generate(num_samples=1, seq_len=8, num_steps=2, generator=0)
    assert model.training


# Conditioning


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_prompt_tokens_never_change(model, sampler):
    prompt = torch.tensor([5, 6, 7, 8, EOD_ID, 9])
    ids = model.generate(num_samples=2, seq_len=20, num_steps=6, sampler=sampler, prompt_ids=prompt, generator=1)
    assert torch.equal(ids[:, : len(prompt)], prompt.expand(2, -1))
    assert not (ids == MASK_ID).any()


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_template_tokens_never_change(model, sampler):
    template = torch.tensor([
        [3, MASK_ID, MASK_ID, 4, 5, MASK_ID, 6, MASK_ID],
        [MASK_ID, 7, MASK_ID, MASK_ID, 8, 9, 10, MASK_ID],
    ])
    fixed_positions = template != MASK_ID
    ids = model.generate(num_steps=4, sampler=sampler, template_ids=template, generator=2)
    assert torch.equal(ids[fixed_positions], template[fixed_positions])
    assert not (ids == MASK_ID).any()


def test_one_row_prompt_is_shared_by_all_samples(model):
    ids = model.generate(num_samples=3, seq_len=10, num_steps=4, prompt_ids=torch.tensor([[11, 12]]), generator=0)
    assert torch.equal(ids[:, :2], torch.tensor([[11, 12]] * 3))


def test_stop_at_eod_cuts_before_first_eod(model):
    template = torch.tensor([MASK_ID] * 6 + [EOD_ID] + [MASK_ID] * 5)
    full = model.generate(num_samples=4, template_ids=template, num_steps=4, generator=4)
    cut = model.generate(num_samples=4, template_ids=template, num_steps=4, generator=4, stop_at_eod=True)
    for row, cut_row in zip(full, cut):
        first_eod = int((row == EOD_ID).nonzero()[0])
        assert torch.equal(cut_row, row[:first_eod])


# Samplers


def test_ddpm_cache_equals_ddpm_with_fewer_passes(model):
    kwargs = dict(num_samples=2, seq_len=16, num_steps=64, generator=11, return_dict_in_generate=True)
    ddpm = model.generate(sampler="ddpm", **kwargs)
    cached = model.generate(sampler="ddpm_cache", **kwargs)
    assert torch.equal(ddpm.sequences, cached.sequences)
    assert ddpm.num_forward_passes >= 64
    assert cached.num_forward_passes < ddpm.num_forward_passes
    # The model is recomputed only after a step that unmasked something, and 2 rows of 16 tokens allow at
    # most 32 such steps.
    assert cached.num_forward_passes <= 2 * 16 + 1


def test_ddpm_cache_equals_ddpm_with_top_p(model):
    kwargs = dict(num_samples=2, seq_len=20, num_steps=40, generator=12, top_p=0.8, temperature=0.7,
                  prompt_ids=torch.tensor([3, 4, 5]))
    assert torch.equal(model.generate(sampler="ddpm", **kwargs), model.generate(sampler="ddpm_cache", **kwargs))


@pytest.mark.parametrize("confidence_threshold", [None, 0.01, 0.5])
@pytest.mark.parametrize("num_steps", [5, 64])
def test_confidence_sampler_stays_within_num_steps(model, confidence_threshold, num_steps):
    output = model.generate(
        num_samples=2, seq_len=16, num_steps=num_steps, sampler="confidence", generator=0,
        confidence_threshold=confidence_threshold, return_dict_in_generate=True,
    )
    assert output.num_forward_passes <= num_steps
    assert not (output.sequences == MASK_ID).any()


def test_confidence_threshold_needs_fewer_passes(model):
    # The random model spreads its mass almost evenly over 38 tokens, so every position has confidence near
    # 1/38 > 0.01, and a threshold of 0.01 unmasks all of them in the first step.
    kwargs = dict(
        num_samples=2, seq_len=16, num_steps=8, sampler="confidence", generator=0, return_dict_in_generate=True
    )
    fixed = model.generate(**kwargs)
    threshold = model.generate(confidence_threshold=0.01, **kwargs)
    assert fixed.num_forward_passes == 8
    assert threshold.num_forward_passes == 1


def test_greedy_confidence_sampler_ignores_generator(model):
    kwargs = dict(num_samples=2, seq_len=12, num_steps=4, sampler="confidence", temperature=0.0)
    assert torch.equal(model.generate(generator=0, **kwargs), model.generate(generator=1, **kwargs))


def test_ddpm_single_position_follows_model_distribution(peaked_model):
    expected = mask_position_probs(peaked_model)
    ids = peaked_model.generate(num_samples=20_000, seq_len=1, num_steps=2, sampler="ddpm", generator=0)
    observed = torch.bincount(ids[:, 0], minlength=VOCAB_SIZE).double() / ids.shape[0]
    total_variation = 0.5 * (observed - expected).abs().sum()
    assert expected.max() > 0.1  # the model is far from uniform over 38 tokens
    assert total_variation < 0.02  # about 0.005 from 20 000 draws; ignoring the model gives about 0.8


def test_top_p_draws_only_from_nucleus(peaked_model):
    probs = mask_position_probs(peaked_model)
    sorted_probs, order = probs.sort(descending=True)
    nucleus_size = int((sorted_probs.cumsum(0) - sorted_probs < 0.5).sum())
    nucleus = set(order[:nucleus_size].tolist())
    ids = peaked_model.generate(num_samples=2000, seq_len=1, num_steps=2, top_p=0.5, generator=0)
    assert set(ids[:, 0].tolist()) <= nucleus
    assert nucleus_size < VOCAB_SIZE - 2


def test_zero_temperature_takes_most_likely_token(peaked_model):
    most_likely = int(mask_position_probs(peaked_model).argmax())
    ids = peaked_model.generate(num_samples=50, seq_len=1, num_steps=2, temperature=0.0, generator=0)
    assert (ids == most_likely).all()


def test_sample_categorical_reproduces_rare_categories():
    probs = torch.tensor([0.5, 0.3, 0.1997, 1e-4, 1e-4, 1e-4, 0.0], dtype=torch.float64)
    num_draws = 1_000_000
    log_probs = probs.log().float().expand(num_draws, -1)
    draws = sample_categorical(log_probs, torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=len(probs)).double()

    expected = probs[:-1] * num_draws
    chi_square = float(((counts[:-1] - expected) ** 2 / expected).sum())
    assert counts[-1] == 0  # probability zero is never drawn
    assert chi_square < 20.5  # the 0.999 quantile of chi-square with 5 degrees of freedom
    for rare in (3, 4, 5):  # expected 100 draws each, standard deviation 10
        assert 60 <= counts[rare] <= 140


def test_inverse_cdf_resolves_tail_below_float32_precision():
    # Category 1 has probability 1e-12, which float32 cannot separate from 1 - 1e-12.
    log_probs = torch.tensor([0.0, math.log(1e-12)])
    assert int(inverse_cdf(log_probs, torch.tensor(1.0 - 5e-13, dtype=torch.float64))) == 1
    assert int(inverse_cdf(log_probs, torch.tensor(1.0 - 2e-12, dtype=torch.float64))) == 0


def test_inverse_cdf_top_uniform_skips_trailing_zero_category():
    log_probs = torch.tensor([0.0, 0.0, -math.inf])
    largest_uniform = torch.tensor(1.0 - 2.0**-53, dtype=torch.float64)
    assert int(inverse_cdf(log_probs, largest_uniform)) == 1


def test_sample_categorical_keeps_leading_shape():
    log_probs = torch.randn(2, 3, 7).log_softmax(-1)
    draws = sample_categorical(log_probs, torch.Generator().manual_seed(0))
    assert draws.shape == (2, 3)
    assert draws.dtype == torch.long


# Blocks and semi-autoregressive windows


def test_block_decoding_fills_blocks_left_to_right(model):
    block_length = 4
    output = model.generate(
        num_samples=2, seq_len=16, num_steps=8, sampler="ddpm", block_length=block_length, generator=0,
        output_trajectory=True,
    )
    for state in output.trajectory:
        for row in state:
            masked = (row == MASK_ID).nonzero()
            if len(masked) == 0:
                continue
            current_block_end = (int(masked[0]) // block_length + 1) * block_length
            assert (row[current_block_end:] == MASK_ID).all()
    assert not (output.sequences == MASK_ID).any()


def test_block_decoding_needs_a_step_per_block(model):
    with pytest.raises(ValueError, match="num_steps=2"):
        model.generate(seq_len=16, num_steps=2, block_length=4, generator=0)


def test_plan_windows_keeps_prompt_when_it_fits():
    assert plan_windows(prompt_length=20, seq_len=30, context=32, stride_length=8) == [(0, 20, 10)]


def test_plan_windows_strides_past_context():
    windows = plan_windows(prompt_length=0, seq_len=60, context=32, stride_length=16)
    assert windows == [(0, 0, 32), (16, 16, 16), (28, 20, 12)]


@pytest.mark.parametrize("sampler", ["ddpm_cache", "confidence"])
def test_semi_autoregressive_blocks_join(model, sampler):
    stride = 16
    final_windows = {}

    def keep_last_window(state):
        final_windows[state.window_index] = (state.window_start, state.prefix_length, state.window_ids.clone())

    ids = model.generate(
        num_samples=2, seq_len=80, num_steps=4, sampler=sampler, stride_length=stride, generator=0,
        prompt_ids=torch.tensor([1, 2, 3]), callback=keep_last_window,
    )
    assert ids.shape == (2, 80)
    assert ids.shape[1] > CONTEXT
    assert len(final_windows) == 4
    assert not (ids == MASK_ID).any()
    for index, (start, prefix_length, window) in final_windows.items():
        assert window.shape[1] <= CONTEXT
        assert torch.equal(window, ids[:, start : start + window.shape[1]]), f"window {index} does not join"
        if index > 0:
            assert prefix_length == CONTEXT - stride


def test_trajectory_starts_masked_and_ends_at_output(model):
    output = model.generate(num_samples=2, seq_len=12, num_steps=6, generator=0, output_trajectory=True)
    assert (output.trajectory[0] == MASK_ID).all()
    assert torch.equal(output.trajectory[-1], output.sequences)


def test_progress_callback_sees_every_step(model):
    steps = []
    model.generate(num_samples=1, seq_len=12, num_steps=6, sampler="ddpm", generator=0,
                   callback=lambda state: steps.append(state.step))
    assert steps[:6] == [1, 2, 3, 4, 5, 6]


# Argument checks


def test_invalid_sampler_raises_value_error(model):
    with pytest.raises(ValueError, match="sampler='beam'"):
        model.generate(seq_len=8, sampler="beam")


def test_prompt_and_template_together_raise(model):
    with pytest.raises(ValueError, match="Both prompt_ids and template_ids"):
        model.generate(prompt_ids=torch.tensor([1]), template_ids=torch.tensor([MASK_ID, 2]))


def test_prompt_with_mask_token_raises(model):
    with pytest.raises(ValueError, match="template_ids"):
        model.generate(seq_len=8, prompt_ids=torch.tensor([1, MASK_ID]))


def test_threshold_with_ddpm_raises(model):
    with pytest.raises(ValueError, match="confidence_threshold=0.9"):
        model.generate(seq_len=8, sampler="ddpm", confidence_threshold=0.9)


def test_template_longer_than_context_raises(model):
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=32"):
        model.generate(template_ids=torch.full((CONTEXT + 1,), MASK_ID))


# Remote code and the sampling script


REMOTE_CODE_SCRIPT = """
import json, sys
sys.modules["mdlm"] = None  # the package must not be needed
import torch
from transformers import AutoModelForMaskedLM
model = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True)
try:
    import mdlm
    importable = True
except ImportError:
    importable = False
ids = model.generate(num_samples=2, seq_len=12, num_steps=6, sampler="ddpm", generator=7)
print(json.dumps({"module": type(model).__module__, "mdlm_importable": importable, "ids": ids.tolist()}))
"""


def test_remote_code_checkpoint_generates_same_ids(model, tmp_path):
    folder = tmp_path / "checkpoint"
    model.save_pretrained(folder)
    work_dir = tmp_path / "elsewhere"
    work_dir.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_CODE_SCRIPT, str(folder)], cwd=work_dir, env=offline_env(tmp_path),
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    expected = model.generate(num_samples=2, seq_len=12, num_steps=6, sampler="ddpm", generator=7)
    assert not loaded["mdlm_importable"]
    assert loaded["module"].startswith("transformers_modules")
    assert loaded["ids"] == expected.tolist()


def build_checkpoint_with_tokenizer(folder: Path):
    """Save a tiny random MDLM next to a small byte-level BPE tokenizer trained on a few sentences."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["[MASK]", "<|endoftext|>", "[PAD]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    sentences = ["the cat sat on the mat", "a dog ran in the park", "the sun is warm today", "birds sing at dawn"]
    backend.train_from_iterator(sentences, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, mask_token="[MASK]", eos_token="<|endoftext|>", pad_token="[PAD]"
    )
    model = make_model(
        vocab_size=len(tokenizer), mask_token_id=tokenizer.mask_token_id, eod_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return tokenizer


def test_run_sample_writes_jsonl(tmp_path):
    folder = tmp_path / "checkpoint"
    tokenizer = build_checkpoint_with_tokenizer(folder)
    output_file = tmp_path / "samples.jsonl"
    command = [
        sys.executable, str(REPO_ROOT / "run_sample.py"), "--model_name_or_path", str(folder), "--num_samples", "3",
        "--batch_size", "2", "--num_steps", "8", "--seq_len", "12", "--prompt", "the cat", "--seed", "0",
        "--output_file", str(output_file), "--show_steps", "--show_every", "4", "--device", "cpu",
    ]
    result = subprocess.run(
        command, cwd=tmp_path, env=offline_env(tmp_path), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr

    records = [json.loads(line) for line in output_file.read_text().splitlines()]
    prompt_ids = tokenizer("the cat", add_special_tokens=False)["input_ids"]
    assert len(records) == 3
    for record in records:
        assert {"text", "token_ids", "sampler", "num_steps", "seed", "trajectory"} <= record.keys()
        assert len(record["token_ids"]) == 12
        assert record["token_ids"][: len(prompt_ids)] == prompt_ids
        assert tokenizer.mask_token_id not in record["token_ids"]
        assert "[MASK]" in record["trajectory"][0]["text"]
        assert record["text"].startswith("the cat")
    assert "=== sample 2 ===" in result.stdout


def load_run_sample():
    spec = importlib.util.spec_from_file_location("run_sample", REPO_ROOT / "run_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_sample_missing_folder_names_path(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint"):
        load_run_sample().main(["--model_name_or_path", str(missing)])
