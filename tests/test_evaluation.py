"""Tests of MDLM evaluation: the perplexity bound and its standard error, generative perplexity under a causal LM,
unigram entropy, and the `run_eval.py` script. Models are tiny and trained here, and nothing is downloaded."""

import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mdlm import MdlmConfig, MdlmForMaskedDiffusion
from mdlm.collator import DataCollatorForMaskedDiffusion
from mdlm.data import load_local_files, load_tokenizer, tokenize_and_pack
from mdlm.evaluation import (
    causal_lm_perplexity, generative_perplexity, perplexity_bound, plan_scoring_windows, ratio_estimate,
    unigram_entropy,
)

from conftest import EOD_ID, MASK_ID, PAD_ID, REPO_ROOT, random_tokens, tiny_model


BLOCK_LENGTH = 64
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Run the tiny models on one thread. Several threads only add synchronization to such small matrices, and
    on a machine shared with other jobs they can slow these tests down by orders of magnitude."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_blocks(num_blocks: int = 24, length: int = 33, seed: int = 0) -> list[dict]:
    return [{"input_ids": row} for row in random_tokens(num_blocks, length, seed=seed).tolist()]


def tiny_collator() -> DataCollatorForMaskedDiffusion:
    return DataCollatorForMaskedDiffusion(mask_token_id=MASK_ID, eod_token_id=EOD_ID, pad_token_id=PAD_ID)


@pytest.fixture(scope="module")
def random_model():
    return tiny_model().eval()


# The perplexity bound


def test_bound_same_seed_same_result(random_model):
    first = perplexity_bound(random_model, random_blocks(), tiny_collator(), batch_size=8, mc_samples=2, seed=3)
    second = perplexity_bound(random_model, random_blocks(), tiny_collator(), batch_size=8, mc_samples=2, seed=3)
    assert first == second


def test_bound_depends_on_seed(random_model):
    first = perplexity_bound(random_model, random_blocks(), tiny_collator(), mc_samples=2, seed=0)
    second = perplexity_bound(random_model, random_blocks(), tiny_collator(), mc_samples=2, seed=1)
    assert first.nelbo_per_token != second.nelbo_per_token


def test_bound_ignores_collator_seed_and_batch_size(random_model):
    collator = tiny_collator()
    reference = perplexity_bound(random_model, random_blocks(), collator, batch_size=32, mc_samples=4, seed=0)
    collator.seed = 99
    other = perplexity_bound(random_model, random_blocks(), collator, batch_size=5, mc_samples=4, seed=0)
    assert other.nelbo_per_token == pytest.approx(reference.nelbo_per_token, rel=1e-6)
    assert other.standard_error == pytest.approx(reference.standard_error, rel=1e-5)


def test_bound_reports_counts(random_model):
    result = perplexity_bound(random_model, random_blocks(24, 33), tiny_collator(), mc_samples=3)
    assert result.num_sequences == 24
    assert result.num_tokens == 24 * 32  # the collator drops each packed block's last token
    assert result.mc_samples == 3
    assert result.perplexity_bound == pytest.approx(math.exp(result.nelbo_per_token))
    lower, upper = result.perplexity_interval_95
    assert lower < result.perplexity_bound < upper


def test_standard_error_shrinks_with_mc_samples(random_model):
    def mean_standard_error(mc_samples):
        errors = [
            perplexity_bound(random_model, random_blocks(), tiny_collator(), mc_samples=mc_samples, seed=seed)
            .standard_error
            for seed in range(4)
        ]
        return statistics.mean(errors)

    one_draw = mean_standard_error(1)
    sixteen_draws = mean_standard_error(16)
    # The Monte Carlo noise dominates for a random model on random tokens, so 16 draws cut the error about 4-fold.
    assert sixteen_draws < one_draw / 2


def test_standard_error_matches_spread_over_seeds(random_model):
    results = [
        perplexity_bound(random_model, random_blocks(), tiny_collator(), mc_samples=4, seed=seed)
        for seed in range(30)
    ]
    spread = statistics.stdev(result.nelbo_per_token for result in results)
    reported = statistics.mean(result.standard_error for result in results)
    assert 0.6 < reported / spread < 1.7


def test_uniform_model_bound_matches_log_vocab(random_model):
    uniform_model = tiny_model()
    torch.nn.init.zeros_(uniform_model.lm_head.weight)
    with torch.no_grad():
        log_probs = uniform_model(torch.tensor([[MASK_ID]])).logits[0, 0]
    num_predicted = int(torch.isfinite(log_probs).sum())
    # Each masked token costs log(num_predicted) with weight 1/t, and a token is masked with probability
    # (1 - noise_eps) * t, so the expected NELBO per token is (1 - noise_eps) * log(num_predicted).
    expected = (1 - uniform_model.config.noise_eps) * math.log(num_predicted)
    result = perplexity_bound(uniform_model, random_blocks(), tiny_collator(), mc_samples=32, seed=0)
    assert abs(result.nelbo_per_token - expected) < 3 * result.standard_error
    assert result.standard_error < 0.1  # small enough that the first check can fail


def test_ratio_estimate_hand_example():
    # R = 15 / 6 = 2.5, the residuals N - R c are -0.5, -1 and 1.5, so SE = sqrt(3 / 2 * 3.5) / 6.
    ratio, standard_error = ratio_estimate(torch.tensor([2.0, 4.0, 9.0]), torch.tensor([1.0, 2.0, 3.0]))
    assert ratio == pytest.approx(2.5)
    assert standard_error == pytest.approx(math.sqrt(1.5 * 3.5) / 6)


def test_ratio_estimate_single_sequence_has_no_error():
    ratio, standard_error = ratio_estimate(torch.tensor([3.0]), torch.tensor([2.0]))
    assert ratio == 1.5
    assert math.isnan(standard_error)


def test_bound_rejects_bad_arguments(random_model):
    with pytest.raises(ValueError, match="mc_samples=0"):
        perplexity_bound(random_model, random_blocks(), tiny_collator(), mc_samples=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        perplexity_bound(random_model, random_blocks(), tiny_collator(), batch_size=0)
    with pytest.raises(ValueError, match="empty"):
        perplexity_bound(random_model, [], tiny_collator())


def test_bound_restores_training_mode():
    model = tiny_model().train()
    perplexity_bound(model, random_blocks(4), tiny_collator())
    assert model.training


# Training on KJV text: the bound must fall


@pytest.fixture(scope="module")
def kjv_blocks(kjv_dir):
    """The KJV validation text in blocks of 65 ids of the tokenizer that ships with mdlm, and that tokenizer."""
    tokenizer = load_tokenizer(None)
    raw = load_local_files({"train": str(kjv_dir / "validation.txt")}, "paragraph", cache_dir=None)
    blocks = tokenize_and_pack(raw, tokenizer, "text", BLOCK_LENGTH)["train"]
    return blocks, tokenizer


@pytest.fixture(scope="module")
def kjv_models(kjv_blocks, tmp_path_factory):
    """An untrained MDLM and a copy trained for 60 steps on all but the last 32 blocks, saved with the tokenizer."""
    blocks, tokenizer = kjv_blocks
    train_blocks = blocks.select(range(len(blocks) - 32))
    torch.manual_seed(0)
    config = MdlmConfig(
        vocab_size=4096, tokenizer_vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=BLOCK_LENGTH, mask_token_id=tokenizer.mask_token_id,
        eod_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    untrained = MdlmForMaskedDiffusion(config).eval()
    trained = MdlmForMaskedDiffusion(config)
    trained.load_state_dict(untrained.state_dict())

    collator = kjv_collator(tokenizer)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        indices = torch.randint(len(train_blocks), (16,), generator=generator).tolist()
        loss = trained(**collator([train_blocks[i] for i in indices])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    trained.eval()

    folder = tmp_path_factory.mktemp("kjv-mdlm")
    trained.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return untrained, trained, folder


def kjv_collator(tokenizer) -> DataCollatorForMaskedDiffusion:
    return DataCollatorForMaskedDiffusion(
        mask_token_id=tokenizer.mask_token_id, eod_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def test_trained_model_has_lower_bound_than_untrained(kjv_blocks, kjv_models):
    blocks, tokenizer = kjv_blocks
    held_out = blocks.select(range(len(blocks) - 32, len(blocks)))
    untrained, trained, _ = kjv_models
    before = perplexity_bound(untrained, held_out, kjv_collator(tokenizer), mc_samples=2)
    after = perplexity_bound(trained, held_out, kjv_collator(tokenizer), mc_samples=2)
    assert after.nelbo_per_token < before.nelbo_per_token - 1.0
    assert before.nelbo_per_token - after.nelbo_per_token > 3 * (before.standard_error + after.standard_error)


# Generative perplexity


@pytest.fixture(scope="module")
def judge_dir(local_tokenizer_dir, kjv_dir, tmp_path_factory):
    """A one-layer Llama trained for 60 steps on KJV validation text with a local BPE, saved with that tokenizer."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(local_tokenizer_dir)
    ids = []
    for document in (kjv_dir / "validation.txt").read_text().split("\n\n"):
        ids += tokenizer(document, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor(ids)
    blocks = ids[: len(ids) // BLOCK_LENGTH * BLOCK_LENGTH].view(-1, BLOCK_LENGTH)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=BLOCK_LENGTH, bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=None, tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = blocks[torch.randint(len(blocks), (16,), generator=generator)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    folder = tmp_path_factory.mktemp("judge")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def judge(judge_dir):
    model = LlamaForCausalLM.from_pretrained(judge_dir).eval()
    return model, PreTrainedTokenizerFast.from_pretrained(judge_dir)


def kjv_passages(kjv_dir, count: int = 8, num_characters: int = 400) -> list[str]:
    documents = (kjv_dir / "test.txt").read_text().split("\n\n")
    return [document[:num_characters] for document in documents[:count]]


def token_soup(tokenizer, count: int = 8, length: int = 100) -> list[str]:
    generator = torch.Generator().manual_seed(1)
    return [
        tokenizer.decode(torch.randint(1, len(tokenizer), (length,), generator=generator).tolist())
        for _ in range(count)
    ]


def test_generative_perplexity_real_text_below_token_soup(judge_dir, judge, kjv_dir):
    _, tokenizer = judge
    real = generative_perplexity(kjv_passages(kjv_dir), str(judge_dir), device="cpu")
    soup = generative_perplexity(token_soup(tokenizer), str(judge_dir), device="cpu")
    assert math.isfinite(real.perplexity)
    assert math.isfinite(soup.perplexity)
    assert real.perplexity < soup.perplexity / 10
    assert real.causal_lm == str(judge_dir)
    assert real.num_samples == 8


def test_causal_lm_perplexity_matches_model_loss(judge):
    model, tokenizer = judge
    text = "And God said, Let there be light: and there was light."
    ids = [tokenizer.eos_token_id, *tokenizer(text, add_special_tokens=False)["input_ids"]]
    with torch.no_grad():
        loss = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss
    result = causal_lm_perplexity([text], model, tokenizer)
    assert result.num_tokens == len(ids) - 1  # every text token is scored after the prepended EOS
    assert result.nll_per_token == pytest.approx(float(loss), rel=1e-5)


def test_sliding_window_scores_every_token_once(judge, kjv_dir):
    model, tokenizer = judge
    passages = kjv_passages(kjv_dir, count=3, num_characters=1000)  # longer than the 64-token context
    default = causal_lm_perplexity(passages, model, tokenizer)
    narrow = causal_lm_perplexity(passages, model, tokenizer, max_length=16, stride=4)
    expected_tokens = sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in passages)
    assert default.num_tokens == expected_tokens
    assert narrow.num_tokens == expected_tokens
    assert math.isfinite(narrow.perplexity)
    assert default.max_length == 64
    assert default.stride == 32


def test_batched_windows_match_one_at_a_time(judge, kjv_dir):
    model, tokenizer = judge
    passages = kjv_passages(kjv_dir, count=4, num_characters=300)
    batched = causal_lm_perplexity(passages, model, tokenizer, batch_size=8)
    single = causal_lm_perplexity(passages, model, tokenizer, batch_size=1)
    assert batched.nll_per_token == pytest.approx(single.nll_per_token, rel=1e-5)


def test_generative_standard_error_spans_samples(judge, kjv_dir):
    model, tokenizer = judge
    passages = kjv_passages(kjv_dir, count=5, num_characters=300)
    pooled = causal_lm_perplexity(passages, model, tokenizer)
    alone = [causal_lm_perplexity([text], model, tokenizer) for text in passages]
    sample_nll = torch.tensor([result.nll_per_token * result.num_tokens for result in alone])
    sample_tokens = torch.tensor([float(result.num_tokens) for result in alone])
    expected_nll, expected_error = ratio_estimate(sample_nll, sample_tokens)
    assert pooled.nll_per_token == pytest.approx(expected_nll, rel=1e-5)
    assert pooled.standard_error == pytest.approx(expected_error, rel=1e-4)
    assert pooled.standard_error > 0
    assert math.isnan(alone[0].standard_error)


@pytest.mark.parametrize(
    "num_ids, max_length, stride", [(2, 4, 1), (10, 4, 1), (10, 4, 3), (100, 16, 8), (17, 16, 8), (16, 16, 5)]
)
def test_scoring_windows_cover_each_position_once(num_ids, max_length, stride):
    windows = plan_scoring_windows(num_ids, max_length, stride)
    scored = [position for _, end, first_scored in windows for position in range(first_scored, end)]
    assert scored == list(range(1, num_ids))
    for index, (start, end, first_scored) in enumerate(windows):
        assert end - start <= max_length
        assert start < first_scored
        if index > 0:
            assert first_scored - start >= max_length - stride


def test_causal_lm_perplexity_rejects_bad_stride(judge):
    model, tokenizer = judge
    with pytest.raises(ValueError, match="stride=64"):
        causal_lm_perplexity(["In the beginning"], model, tokenizer, stride=64)
    with pytest.raises(ValueError, match="exceeds the causal LM's context"):
        causal_lm_perplexity(["In the beginning"], model, tokenizer, max_length=65)


def test_generative_perplexity_decodes_token_ids(judge_dir, kjv_blocks, kjv_dir):
    _, mdlm_tokenizer = kjv_blocks
    passages = kjv_passages(kjv_dir, count=2, num_characters=200)
    ids = [mdlm_tokenizer(text, add_special_tokens=False)["input_ids"] for text in passages]
    from_ids = generative_perplexity(ids, str(judge_dir), sample_tokenizer=mdlm_tokenizer, device="cpu")
    from_texts = generative_perplexity(passages, str(judge_dir), device="cpu")
    assert from_ids.nll_per_token == pytest.approx(from_texts.nll_per_token)
    with pytest.raises(ValueError, match="sample_tokenizer"):
        generative_perplexity(ids, str(judge_dir))


def test_generative_perplexity_missing_folder_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_judge"):
        generative_perplexity(["text"], str(tmp_path / "no_such_judge"))


# Unigram entropy


def test_unigram_entropy_hand_example():
    # Frequencies 1/2, 1/4 and 1/4 give 1.5 bits, and a constant sequence gives 0.
    assert unigram_entropy([[1, 1, 2, 3]]) == pytest.approx(1.5 * math.log(2))
    assert unigram_entropy([[5, 5, 5, 5]]) == 0.0
    assert unigram_entropy(torch.tensor([[1, 1, 2, 3], [5, 5, 5, 5]])) == pytest.approx(0.75 * math.log(2))


def test_unigram_entropy_ignores_given_ids():
    assert unigram_entropy([[1, 2, 0, 0, 0]], ignore_token_ids=[0]) == pytest.approx(math.log(2))


def test_unigram_entropy_rejects_empty_sequences():
    with pytest.raises(ValueError, match="Sequence 1"):
        unigram_entropy([[1], [0]], ignore_token_ids=[0])
    with pytest.raises(ValueError, match="No sequences"):
        unigram_entropy([])


# run_eval.py


def load_run_eval():
    spec = importlib.util.spec_from_file_location("run_eval", REPO_ROOT / "run_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_eval_end_to_end_both_modes(kjv_models, judge_dir, kjv_blocks, kjv_dir, tmp_path):
    _, _, mdlm_dir = kjv_models
    blocks, _ = kjv_blocks
    output_file = tmp_path / "results.json"
    samples_file = tmp_path / "samples.jsonl"
    command = [
        sys.executable, str(REPO_ROOT / "run_eval.py"), "--model_name_or_path", str(mdlm_dir),
        "--data_file", str(kjv_dir / "validation.txt"), "--max_seq_length", str(BLOCK_LENGTH),
        "--eval_mc_samples", "2", "--batch_size", "64", "--seed", "1", "--gen_ppl_model", str(judge_dir),
        "--num_samples", "3", "--num_steps", "8", "--sampler", "ddpm", "--seq_len", "32", "--device", "cpu",
        "--output_file", str(output_file), "--samples_file", str(samples_file),
    ]
    env = {**os.environ, **OFFLINE_ENV, "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    results = json.loads(output_file.read_text())
    bound = results["perplexity_bound"]
    assert bound["num_sequences"] == len(blocks)  # the .txt file is evaluated whole, not split
    assert bound["mc_samples"] == 2
    assert bound["seed"] == 1
    assert math.isfinite(bound["nelbo_per_token"])
    generative = results["generative"]
    assert generative["sampler"] == "ddpm"
    assert generative["seq_len"] == 32
    assert generative["forward_passes_per_batch"] == 8
    assert math.isfinite(generative["generative_perplexity"])
    assert generative["gen_nll_standard_error"] > 0
    assert 0 < generative["unigram_entropy_nats"] <= math.log(32)
    assert generative["seconds_per_sample"] > 0
    assert '"generative_perplexity"' in result.stdout
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == 3
    assert all(len(sample["token_ids"]) == 32 for sample in samples)


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        (["--model_name_or_path", "./no_such_model"], FileNotFoundError, "no_such_model"),
        (["--skip_bound"], ValueError, "nothing to evaluate"),
        (["--split", "test"], ValueError, "no test split"),
        (["--data_file", "a.txt", "--hf_raw_repo", "b"], ValueError, "not both"),
        (["--data_file", "missing.txt"], FileNotFoundError, "missing.txt"),
        (["--eval_mc_samples", "0"], ValueError, "--eval_mc_samples 0"),
        (["--gen_ppl_model", "./no_such_judge"], FileNotFoundError, "no_such_judge"),
    ],
)
def test_run_eval_rejects_bad_input(kjv_models, tmp_path, monkeypatch, arguments, error, message):
    _, _, mdlm_dir = kjv_models
    monkeypatch.chdir(tmp_path)
    if "--model_name_or_path" not in arguments:
        arguments = ["--model_name_or_path", str(mdlm_dir), *arguments]
    with pytest.raises(error, match=message):
        load_run_eval().main(arguments)


def test_run_eval_resolves_splits(tmp_path):
    run_eval = load_run_eval()
    from mdlm.arguments import DataArguments

    train_file = tmp_path / "train.txt"
    validation_file = tmp_path / "validation.txt"
    train_file.write_text("some text")
    validation_file.write_text("more text")
    assert run_eval.resolve_text_source(DataArguments(), None)["file"].endswith("validation.txt.gz")
    assert run_eval.resolve_text_source(DataArguments(), "train")["file"].endswith("train.txt.gz")
    with_files = DataArguments(data_file=str(train_file), validation_file=str(validation_file))
    assert run_eval.resolve_text_source(with_files, None)["file"] == str(train_file)
    assert run_eval.resolve_text_source(with_files, "validation")["file"] == str(validation_file)
    with pytest.raises(ValueError, match="--split validation needs its own file"):
        run_eval.resolve_text_source(DataArguments(data_file=str(train_file)), "validation")
    hub = run_eval.resolve_text_source(DataArguments(hf_raw_repo="Salesforce/wikitext", hf_raw_split="x"), None)
    assert hub == {"repo": "Salesforce/wikitext", "config": "x", "split": "validation"}
