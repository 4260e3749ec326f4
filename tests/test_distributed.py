"""Distributed training on CPU over gloo: exact NELBO normalization, per-rank noise, data sharding, checkpoints,
run_mdlm.py --distributed end to end, and a failure on one rank.

Each multi-process check runs real processes under `torch.distributed.run`, each with one OpenMP thread, because
processes that share two cores with torch's default thread count slow down by orders of magnitude.
"""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import run_mdlm
from distributed_checks import (
    RecordingTrainer, packed_collator, packed_dataset, packed_training_arguments, run_sgd_step,
)
from run_mdlm_failing_rank import FAILURE_MESSAGE

from conftest import REPO_ROOT, tiny_model


NUM_PROCESSES = 2
# Guards against a hang, far above the ~30 s these runs take on two shared cores.
LAUNCH_TIMEOUT_S = 300
FAILURE_TIMEOUT_S = 120
TINY_RUN = [
    "--d_model", "32", "--n_layers", "1", "--n_heads", "2", "--max_seq_length", "32", "--batch_size", "4",
    "--max_steps", "4", "--save_steps", "2", "--logging_steps", "1", "--max_eval_samples", "16",
]


def subprocess_env(**extra) -> dict:
    return {
        **os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", **extra,
    }


def run_command(command, cwd, timeout, **env):
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=subprocess_env(**env)
    )


def failure_report(result) -> str:
    return result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def kjv_validation_file(kjv_dir):
    path = kjv_dir / "validation.txt"
    if not path.is_file():
        pytest.fail(f"The shared KJV corpus is missing {path}; the distributed end-to-end run trains on it.")
    return path


@pytest.fixture(scope="module")
def rank_records(tmp_path_factory):
    """Run tests/distributed_checks.py on two gloo processes and return each rank's record and the output folder."""
    output_dir = tmp_path_factory.mktemp("distributed-checks")
    result = run_command(
        [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={NUM_PROCESSES}",
            str(REPO_ROOT / "tests" / "distributed_checks.py"), str(output_dir),
        ],
        cwd=output_dir, timeout=LAUNCH_TIMEOUT_S,
    )
    assert result.returncode == 0, failure_report(result)
    records = [torch.load(output_dir / f"rank{rank}.pt", weights_only=True) for rank in range(NUM_PROCESSES)]
    return records, output_dir


@pytest.fixture(scope="module")
def single_process_sgd_step(tmp_path_factory):
    """The SGD step of the distributed checks, on one process with all four examples in one batch."""
    return run_sgd_step(tmp_path_factory.mktemp("single-sgd-step"), batch_size=4, accumulation=1)


SGD_RUNS = ["sgd_step", "sgd_step_accumulated"]  # 2 examples per rank, or 1 per micro-batch and 2 micro-batches


def test_trainer_ranks_train_together_over_gloo(rank_records):
    records, _ = rank_records
    for record in records:
        assert record["sgd_step"]["backend"] == "gloo"
        assert record["sgd_step"]["distributed_type"] == "MULTI_CPU"
        assert record["sgd_step"]["world_size"] == NUM_PROCESSES


@pytest.mark.parametrize("run", SGD_RUNS)
def test_ranks_count_different_token_numbers(rank_records, run):
    records, _ = rank_records
    rank0, rank1 = (record[run]["local_counts"][0] for record in records)
    assert rank0 != rank1


@pytest.mark.parametrize("run", SGD_RUNS)
def test_token_count_spans_ranks_and_micro_batches(rank_records, single_process_sgd_step, run):
    records, _ = rank_records
    local_total = sum(record[run]["local_counts"][0] for record in records)
    for record in records:
        assert record[run]["global_counts"] == [local_total]
    assert local_total == single_process_sgd_step["global_counts"][0]


@pytest.mark.parametrize("run", SGD_RUNS)
def test_two_ranks_log_the_loss_of_one_process(rank_records, single_process_sgd_step, run):
    records, _ = rank_records
    for record in records:
        assert record[run]["loss"] == pytest.approx(single_process_sgd_step["loss"], rel=1e-5)


@pytest.mark.parametrize("run", SGD_RUNS)
def test_two_ranks_step_like_one_process(rank_records, single_process_sgd_step, run):
    records, _ = rank_records
    assert sorted(sum(records[0][run]["example_ids"] + records[1][run]["example_ids"], [])) == [0, 1, 2, 3]
    for name, update in single_process_sgd_step["updates"].items():
        for record in records:
            torch.testing.assert_close(record[run]["updates"][name], update, rtol=1e-5, atol=1e-7, msg=name)


def test_collator_reads_rank_from_process_group(rank_records):
    records, _ = rank_records
    assert [record["noise"]["rank"] for record in records] == [0, 1]
    assert [record["noise"]["world_size"] for record in records] == [NUM_PROCESSES, NUM_PROCESSES]


def test_ranks_draw_different_times_and_masks(rank_records):
    rank0, rank1 = (record["noise"] for record in rank_records[0])
    assert not torch.equal(rank0["t"], rank1["t"])
    assert not torch.equal(rank0["input_ids"], rank1["input_ids"])


def test_time_strata_span_the_global_batch(rank_records):
    records, _ = rank_records
    times = torch.cat([record["noise"]["t"] for record in records]).double()
    sampling_eps = records[0]["noise"]["sampling_eps"]
    uniform = ((times - sampling_eps) / (1 - sampling_eps)).sort().values
    global_size = len(uniform)
    gaps = torch.diff(torch.cat([uniform, uniform[:1] + 1]))  # cyclic gaps between neighbouring draws
    torch.testing.assert_close(gaps, torch.full_like(gaps, 1 / global_size), rtol=0, atol=1e-6)


def test_noise_reproducible_per_seed(rank_records):
    for record in rank_records[0]:
        noise = record["noise"]
        assert torch.equal(noise["repeat_t"], noise["t"])
        assert torch.equal(noise["repeat_input_ids"], noise["input_ids"])
        assert not torch.equal(noise["other_seed_t"], noise["t"])


def test_trainer_ranks_draw_different_times(rank_records):
    records, _ = rank_records
    rank0, rank1 = (record["packed"]["times"] for record in records)
    assert len(rank0) == len(rank1) == 4
    for step_times0, step_times1 in zip(rank0, rank1):
        assert step_times0 != step_times1


def test_ranks_train_on_disjoint_shards(rank_records):
    records, _ = rank_records
    rank0, rank1 = (set(sum(record["packed"]["example_ids"], [])) for record in records)
    assert rank0.isdisjoint(rank1)


def test_shards_cover_the_epoch_once(rank_records):
    records, _ = rank_records
    seen = sorted(sum(records[0]["packed"]["example_ids"] + records[1]["packed"]["example_ids"], []))
    assert seen == list(range(len(packed_dataset())))


def test_parameters_identical_on_all_ranks_after_training(rank_records):
    records, _ = rank_records
    assert records[0]["packed"]["global_step"] == 4
    for name, parameter in records[0]["packed"]["parameters"].items():
        assert torch.equal(records[1]["packed"]["parameters"][name], parameter), name


def test_checkpoint_stores_each_rank_state(rank_records):
    _, output_dir = rank_records
    checkpoint = output_dir / "packed" / "checkpoint-2"
    for rank in range(NUM_PROCESSES):
        assert (checkpoint / f"rng_state_{rank}.pth").is_file()
        assert (checkpoint / f"noise_state_{rank}.pth").is_file()


def test_distributed_resume_continues_data_and_noise(rank_records):
    for record in rank_records[0]:
        uninterrupted, resumed = record["packed"], record["packed_resumed"]
        assert resumed["global_step"] == 4
        assert resumed["example_ids"] == uninterrupted["example_ids"][2:]
        assert resumed["times"] == uninterrupted["times"][2:]
        assert resumed["losses"] == pytest.approx(uninterrupted["losses"], rel=1e-6)


def test_distributed_resume_matches_uninterrupted_parameters(rank_records):
    for record in rank_records[0]:
        for name, parameter in record["packed"]["parameters"].items():
            torch.testing.assert_close(record["packed_resumed"]["parameters"][name], parameter, msg=name)


@pytest.fixture(scope="module")
def single_process_resume(rank_records, tmp_path_factory):
    """Resume the two-rank checkpoint after step 2 in this process, with the same global batch of 4 blocks."""
    _, output_dir = rank_records
    trainer = RecordingTrainer(
        model=tiny_model(seed=5),
        args=packed_training_arguments(tmp_path_factory.mktemp("single-resume"), batch_size=2 * NUM_PROCESSES),
        train_dataset=packed_dataset(), data_collator=packed_collator(),
    )
    trainer.train(resume_from_checkpoint=str(output_dir / "packed" / "checkpoint-2"))
    return trainer


def test_single_process_resumes_distributed_checkpoint(rank_records, single_process_resume):
    records, _ = rank_records
    trainer = single_process_resume
    assert trainer.state.global_step == 4
    # Steps 3 and 4 train on the global batches that the two ranks trained on together.
    distributed_steps = [
        sorted(ids0 + ids1)
        for ids0, ids1 in zip(records[0]["packed"]["example_ids"][2:], records[1]["packed"]["example_ids"][2:])
    ]
    assert [sorted(ids) for ids in trainer.example_ids] == distributed_steps
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged[:2] == pytest.approx(records[0]["packed"]["losses"][:2], rel=1e-6)


def test_single_process_resume_restarts_noise_from_seed(single_process_resume):
    # The saved noise belongs to one rank of two, which one process cannot continue.
    features = [packed_dataset()[i] for i in range(2 * NUM_PROCESSES)]
    assert single_process_resume.times[0] == packed_collator()(features)["t"].tolist()


def test_trainer_rejects_ranks_that_would_train_alone(rank_records):
    records, _ = rank_records
    for record in records:
        assert "world_size=1" in record["misconfigured_error"]
        assert "use_cpu=True" in record["misconfigured_error"]


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory, kjv_validation_file):
    """`run_mdlm.py --distributed --nproc_per_node 2` on CPU: four steps of a tiny model, checkpoints every two."""
    tmp_path = tmp_path_factory.mktemp("distributed-run")
    output_dir = tmp_path / "out"
    result = run_command(
        [
            sys.executable, str(REPO_ROOT / "run_mdlm.py"), "--distributed", "--nproc_per_node", str(NUM_PROCESSES),
            "--data_file", str(kjv_validation_file), "--output_dir", str(output_dir), *TINY_RUN,
        ],
        cwd=tmp_path, timeout=LAUNCH_TIMEOUT_S,
    )
    assert result.returncode == 0, failure_report(result)
    return output_dir, result.stdout + result.stderr


def test_run_mdlm_relaunches_on_gloo(distributed_run):
    _, output = distributed_run
    assert f"Relaunching with {NUM_PROCESSES} processes (gloo)" in output
    assert "use_cpu=True" in output
    assert "ddp_backend=gloo" in output
    assert "Total train batch size (w. parallel, distributed & accumulation) = 8" in output


def test_run_mdlm_trains_all_steps(distributed_run):
    output_dir, _ = distributed_run
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert len([entry for entry in state["log_history"] if "eval_loss" in entry]) == 1


def test_run_mdlm_reports_on_main_process_only(distributed_run):
    _, output = distributed_run
    assert output.count("Model, tokenizer and code saved to") == 1
    assert output.count("***** train metrics *****") == 1
    assert output.count("***** eval metrics *****") == 1


def test_run_mdlm_writes_outputs_and_rank_states(distributed_run):
    output_dir, _ = distributed_run
    for name in ("model.safetensors", "training_curves.png", "README.md", "eval_results.json"):
        assert (output_dir / name).is_file(), name
    for rank in range(NUM_PROCESSES):
        assert (output_dir / "checkpoint-4" / f"rng_state_{rank}.pth").is_file()
        assert (output_dir / "checkpoint-4" / f"noise_state_{rank}.pth").is_file()


def test_single_process_resumes_run_mdlm_checkpoint(distributed_run, kjv_validation_file):
    output_dir, _ = distributed_run
    resumed = TINY_RUN + ["--batch_size", str(4 * NUM_PROCESSES), "--max_steps", "6"]  # same global batch
    run_mdlm.main(["--data_file", str(kjv_validation_file), "--output_dir", str(output_dir), *resumed])
    state = json.loads((output_dir / "trainer_state.json").read_text())
    losses = [entry for entry in state["log_history"] if "loss" in entry]
    assert state["global_step"] == 6
    assert [entry["step"] for entry in losses] == [1, 2, 3, 4, 5, 6]  # steps 1-4 come from the distributed run


def test_error_on_one_rank_ends_the_run(tmp_path, kjv_validation_file):
    result = run_command(
        [
            sys.executable, str(REPO_ROOT / "tests" / "run_mdlm_failing_rank.py"), "--distributed",
            "--nproc_per_node", str(NUM_PROCESSES), "--data_file", str(kjv_validation_file), "--output_dir",
            str(tmp_path / "out"), *TINY_RUN,
        ],
        cwd=tmp_path, timeout=FAILURE_TIMEOUT_S, FAILING_RANK="1",
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"{FAILURE_MESSAGE} of rank 1" in output
    assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)", output), output[-3000:]
