"""The benchmark scripts: their ablations undo what they claim and keep the loss, and both scripts run end to end.

No timing is asserted. Only what the scripts compute and print besides timings is checked.
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import MASK_ID, REPO_ROOT, random_tokens, tiny_model


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench_train = load_benchmark("bench_train")

ABLATIONS = [name for name in bench_train.ABLATIONS if name != "none"]


def noised_batch(batch_size=3, seq_len=16):
    clean = random_tokens(batch_size, seq_len, seed=1)
    generator = torch.Generator().manual_seed(2)
    masked = torch.rand(batch_size, seq_len, generator=generator) < 0.5
    return {
        "input_ids": torch.where(masked, MASK_ID, clean),
        "labels": torch.where(masked, clean, -100),
        "t": torch.tensor([0.3, 0.6, 0.9]),
    }


def run_benchmark(script, *args):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
        timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    return result


@pytest.mark.parametrize("ablation", ABLATIONS)
def test_ablation_keeps_loss_and_gradients(ablation):
    batch = noised_batch()
    reference, ablated = tiny_model(seed=0), tiny_model(seed=0)
    bench_train.apply_ablation(ablated, ablation)

    losses = []
    for model in (reference, ablated):
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-6, rtol=1e-5)
    for (name, expected), actual in zip(reference.named_parameters(), ablated.parameters()):
        assert torch.allclose(actual.grad, expected.grad, atol=1e-6, rtol=1e-4), name


def test_full_output_layer_ablation_runs_every_position():
    model = tiny_model()
    batch = noised_batch()
    rows = []
    model.lm_head.register_forward_hook(lambda module, inputs, output: rows.append(inputs[0].shape[:-1].numel()))

    model(**batch)
    bench_train.apply_ablation(model, "full_output_layer")
    model(**batch)

    assert rows[0] == int((batch["labels"] != -100).sum())
    assert rows[1] == batch["labels"].numel()


def test_mask_tensor_ablation_passes_mask_to_sdpa(monkeypatch):
    model = tiny_model()
    batch = noised_batch()
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(*args, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(*args, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    num_layers = model.config.num_hidden_layers

    model(**batch)
    assert masks == [None] * num_layers

    bench_train.apply_ablation(model, "attention_mask_tensor")
    model(**batch)
    ablated_masks = masks[num_layers:]
    assert len(ablated_masks) == num_layers
    for mask in ablated_masks:
        assert mask is not None
        assert mask.dtype == torch.bool
        assert bool(mask.all())


def test_uncached_rotary_ablation_rebuilds_tables():
    model = tiny_model()
    batch = noised_batch()

    # The test keeps each table alive, so a rebuilt table is a new tensor even if memory were reused.
    def cached_cos():
        (cos, _), = model.model.rotary._tables.values()
        return cos

    model(**batch)
    first = cached_cos()
    model(**batch)
    assert cached_cos() is first

    bench_train.apply_ablation(model, "uncached_rotary")
    model(**batch)
    rebuilt = cached_cos()
    model(**batch)
    assert rebuilt is not first
    assert cached_cos() is not rebuilt


def test_bench_train_prints_ratios():
    result = run_benchmark(
        "bench_train.py", "--shape", "tiny", "--steps", "1", "--repeats", "2", "--warmup_steps", "1",
        "--batch_size", "2", "--num_threads", "1", "--ablation", "full_output_layer",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ablation full_output_layer: MDLM loss changes by" in result.stdout
    assert "mdlm parameters: 4,065,536" in result.stdout
    assert "llama parameters: 4,065,536" in result.stdout
    speed = re.search(r"ratio mdlm / llama tokens/s .*: ([\d.]+) / ([\d.]+) / ([\d.]+)", result.stdout)
    memory = re.search(r"ratio mdlm / llama peak memory: ([\d.]+), ([\d.]+) at t = 1", result.stdout)
    assert speed is not None, result.stdout
    assert memory is not None, result.stdout
    low, median, high = (float(value) for value in speed.groups())
    assert 0 < low <= median <= high
    assert all(float(value) > 0 for value in memory.groups())


def test_bench_train_rejects_unknown_ablation():
    result = run_benchmark("bench_train.py", "--ablation", "no_such_thing")
    assert result.returncode != 0
    assert "Unknown --ablation 'no_such_thing'" in result.stderr


def parse_sampling_table(stdout):
    """Return {(sampler, steps): (passes per sample, median ratio to ddpm)} from bench_sampling.py's table."""
    rows = {}
    pattern = re.compile(
        r"^(\w+)\s+(\d+)\s+([\d.]+)\s+[\d.]+ / [\d.]+ / [\d.]+\s+[\d.]+\s+[\d.]+ / ([\d.]+) / [\d.]+$", re.M
    )
    for sampler, steps, passes, ratio in pattern.findall(stdout):
        rows[sampler, int(steps)] = (float(passes), float(ratio))
    return rows


def test_bench_sampling_counts_passes():
    result = run_benchmark(
        "bench_sampling.py", "--num_steps", "3", "8", "--num_samples", "2", "--batch_size", "1", "--repeats", "1",
        "--seq_len", "16", "--num_threads", "1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = parse_sampling_table(result.stdout)
    assert set(rows) == {(sampler, steps) for sampler in ("ddpm", "ddpm_cache", "confidence") for steps in (3, 8)}
    for steps in (3, 8):
        assert rows["ddpm", steps] == (steps, 1.0)
        assert rows["confidence", steps][0] == steps
        assert 1 <= rows["ddpm_cache", steps][0] <= steps


def test_bench_sampling_rejects_uneven_batches():
    result = run_benchmark("bench_sampling.py", "--num_samples", "3", "--batch_size", "2")
    assert result.returncode != 0
    assert "--num_samples 3 is not a multiple of --batch_size 2" in result.stderr
