"""run_mdlm.py end to end on the shared KJV corpus, its data options, its short flags and its input errors."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import run_mdlm
from mdlm import MdlmConfig, MdlmForMaskedDiffusion
from mdlm.arguments import parse_arguments
from mdlm.data import load_raw_datasets, load_tokenizer

from conftest import REPO_ROOT


TINY_MODEL = ["--d_model", "64", "--n_layers", "2", "--n_heads", "2", "--max_seq_length", "64"]


def run_script(args, tmp_path, timeout=600):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "run_mdlm.py"), *args], cwd=tmp_path, capture_output=True, text=True,
        timeout=timeout, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def logged_losses(output_dir):
    state = json.loads((output_dir / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry], state


@pytest.fixture(scope="module")
def kjv_run(tmp_path_factory, kjv_dir):
    """One short training run on the KJV train and validation files, shared by the checks below."""
    tmp_path = tmp_path_factory.mktemp("kjv-run")
    output_dir = tmp_path / "out"
    result = run_script(
        [
            "--data_file", str(kjv_dir / "train.txt"), "--validation_file", str(kjv_dir / "validation.txt"),
            "--output_dir", str(output_dir), *TINY_MODEL, "--batch_size", "8", "--max_steps", "40",
            "--learning_rate", "3e-3", "--warmup_steps", "5", "--logging_steps", "5", "--eval_steps", "20",
            "--save_steps", "20", "--max_eval_samples", "32",
        ],
        tmp_path,
    )
    return output_dir, result


def test_training_loss_falls_on_kjv(kjv_run):
    output_dir, _ = kjv_run
    losses, _ = logged_losses(output_dir)
    assert len(losses) == 8
    assert losses[-1] < losses[0] - 1.0


def test_evaluation_perplexity_falls_on_kjv(kjv_run):
    output_dir, _ = kjv_run
    _, state = logged_losses(output_dir)
    perplexities = [entry["eval_perplexity"] for entry in state["log_history"] if "eval_perplexity" in entry]
    assert len(perplexities) >= 2
    assert perplexities[-1] < perplexities[0]


def test_run_writes_model_tokenizer_code_and_plot(kjv_run):
    output_dir, result = kjv_run
    for name in (
        "config.json", "model.safetensors", "modeling_mdlm.py", "configuration_mdlm.py", "noise_schedule.py",
        "tokenizer.json", "training_curves.png", "README.md", "eval_results.json", "train_results.json",
    ):
        assert (output_dir / name).is_file(), name
    assert (output_dir / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "eval_perplexity" in result.stdout
    assert str(output_dir) in result.stdout


def test_run_resumes_from_last_checkpoint(kjv_run, kjv_dir):
    output_dir, _ = kjv_run
    result = run_script(
        [
            "--data_file", str(kjv_dir / "validation.txt"), "--output_dir", str(output_dir), *TINY_MODEL,
            "--batch_size", "8", "--max_steps", "44", "--save_steps", "20", "--max_eval_samples", "8",
        ],
        output_dir.parent,
    )
    assert "Resuming from" in result.stdout + result.stderr
    assert "checkpoint-40" in result.stdout + result.stderr
    _, state = logged_losses(output_dir)
    assert state["global_step"] == 44


def test_run_on_local_dataset_folder_and_tokenizer(tmp_path, kjv_dir, local_tokenizer_dir):
    dataset_dir = tmp_path / "dataset"
    dataset_dir.mkdir()
    for split in ("train", "validation"):
        lines = (kjv_dir / f"{split}.jsonl").read_text().splitlines()[:40]
        records = [json.dumps({"body": json.loads(line)["text"]}) for line in lines]
        (dataset_dir / f"{split}.jsonl").write_text("\n".join(records) + "\n")
    output_dir = tmp_path / "out"
    run_script(
        [
            "--hf_raw_repo", str(dataset_dir), "--hf_text_column", "body", "--hf_tokenizer",
            str(local_tokenizer_dir), "--output_dir", str(output_dir), *TINY_MODEL, "--batch_size", "4",
            "--max_steps", "3", "--max_eval_samples", "8", "--d_ff", "None", "--use_rope", "False",
        ],
        tmp_path,
    )
    config = json.loads((output_dir / "config.json").read_text())
    assert config["vocab_size"] == 512  # 500 BPE tokens + [MASK] + [PAD], rounded up to a multiple of 64
    assert config["tokenizer_vocab_size"] == 502
    assert config["intermediate_size"] == 128
    assert config["use_rope"] is False
    saved_tokenizer = load_tokenizer(str(output_dir))
    assert saved_tokenizer.mask_token_id == config["mask_token_id"]


def test_short_flags_map_to_hf_arguments():
    parser = run_mdlm.build_parser()
    model_args, data_args, training_args, run_args = parse_arguments(
        parser,
        ["--epochs", "2", "--batch_size", "3", "--d_model", "96", "--n_heads", "3", "--n_layers", "5",
         "--d_ff", "None", "--use_rope", "--rope_theta", "500", "--rope_percent", "0.5", "--output_dir", "x"],
    )
    run_mdlm.apply_short_flags(training_args, run_args)
    assert training_args.num_train_epochs == 2
    assert training_args.max_steps == -1
    assert training_args.per_device_train_batch_size == 3
    assert training_args.per_device_eval_batch_size == 3
    assert model_args.hidden_size == 96
    assert model_args.num_attention_heads == 3
    assert model_args.num_hidden_layers == 5
    assert model_args.intermediate_size is None
    assert model_args.use_rope is True
    assert model_args.rope_theta == 500
    assert model_args.rope_percent == 0.5


STEP_FLAG_CASES = [
    ([], True, True),
    (["--do_eval"], False, True),
    (["--do_eval", "--eval_strategy", "no"], False, True),
    (["--do_eval", "False"], True, False),
    (["--do_eval", "False", "--eval_strategy", "no"], True, False),
    (["--do_eval=false"], True, False),
    (["--do_train"], True, True),  # the default eval_strategy "steps" turns do_eval on
    (["--do_train", "--eval_strategy", "no"], True, False),
    (["--do_train", "--do_eval"], True, True),
]


@pytest.mark.parametrize("flags, do_train, do_eval", STEP_FLAG_CASES)
def test_step_flags_choose_train_and_eval(flags, do_train, do_eval):
    argv = [*flags, "--output_dir", "x"]
    _, _, training_args, _ = parse_arguments(run_mdlm.build_parser(), argv)
    run_mdlm.choose_steps(training_args, argv)
    assert training_args.do_train is do_train
    assert training_args.do_eval is do_eval
    if not do_eval:
        assert training_args.eval_strategy == "no"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--do_eval", "False", "--eval_strategy", "steps"], "--do_eval False conflicts with --eval_strategy steps"),
        (["--do_predict"], "no prediction step"),
        (["--do_train", "False", "--eval_strategy", "no"], "Nothing to run"),
    ],
)
def test_contradictory_step_flags_are_rejected(flags, message):
    argv = [*flags, "--output_dir", "x"]
    _, _, training_args, _ = parse_arguments(run_mdlm.build_parser(), argv)
    with pytest.raises(ValueError, match=message):
        run_mdlm.choose_steps(training_args, argv)


def test_architecture_flags_with_checkpoint_warn(tmp_path, caplog):
    tokenizer = load_tokenizer(None)
    config = MdlmConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=32, mask_token_id=tokenizer.mask_token_id, eod_token_id=tokenizer.eos_token_id,
    )
    MdlmForMaskedDiffusion(config).save_pretrained(tmp_path / "checkpoint")
    argv = ["--model_name_or_path", str(tmp_path / "checkpoint"), "--d_model", "64", "--document_attention",
            "--output_dir", "x"]
    model_args, data_args, _, _ = parse_arguments(run_mdlm.build_parser(), argv)

    with caplog.at_level("WARNING", logger=run_mdlm.logger.name):
        model = run_mdlm.build_model(model_args, data_args, tokenizer)

    assert model.config.hidden_size == 32
    assert model.config.document_attention is False
    assert "--hidden_size, --document_attention are ignored" in caplog.text


def test_no_train_and_no_eval_stops_before_writing(tmp_path):
    with pytest.raises(ValueError, match="Nothing to run"):
        run_mdlm.main(["--do_train", "False", "--eval_strategy", "no", "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_missing_data_file_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.txt not found"):
        run_mdlm.main(["--data_file", str(tmp_path / "nothere.txt"), "--output_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_empty_data_file_is_reported(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        run_mdlm.main(["--data_file", str(tmp_path / "empty.txt"), "--output_dir", str(tmp_path / "out")])


def test_missing_text_column_names_existing_columns(tmp_path, kjv_dir):
    with pytest.raises(ValueError, match="'body' not found.*book, chapter, text"):
        run_mdlm.main(
            ["--data_file", str(kjv_dir / "test.jsonl"), "--hf_text_column", "body", "--output_dir", str(tmp_path)]
        )


def test_missing_tokenizer_folder_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="Tokenizer folder .*no_tokenizer not found"):
        run_mdlm.main(["--hf_tokenizer", str(tmp_path / "no_tokenizer"), "--output_dir", str(tmp_path / "out")])


def test_invalid_model_size_is_reported(tmp_path):
    with pytest.raises(ValueError, match="num_attention_heads=3: it must divide hidden_size=64"):
        run_mdlm.main(["--d_model", "64", "--n_heads", "3", "--output_dir", str(tmp_path / "out")])


def test_nonempty_output_dir_without_checkpoint_is_kept(tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty and contains no checkpoint"):
        run_mdlm.main(["--output_dir", str(output_dir)])
    assert (output_dir / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_tabular_and_json_files_load(tmp_path, suffix):
    from datasets import Dataset

    data = Dataset.from_dict({"id": [1, 2, 3], "content": ["In the beginning.", "", "And the earth."]})
    path = tmp_path / f"docs{suffix}"
    {".csv": data.to_csv, ".parquet": data.to_parquet, ".json": data.to_json}[suffix](str(path))
    raw = load_raw_datasets(data_file=str(path), text_column="content", validation_split_percentage=34)
    assert len(raw["train"]) + len(raw["validation"]) == 3


def test_txt_file_splits_by_blank_line_or_by_line(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("first line\nsame document\n\nsecond document\n\nthird\n")
    by_paragraph = load_raw_datasets(data_file=str(path), validation_split_percentage=34)
    by_line = load_raw_datasets(data_file=str(path), txt_sample_by="line", validation_split_percentage=34)
    assert len(by_paragraph["train"]) + len(by_paragraph["validation"]) == 3
    assert len(by_line["train"]) + len(by_line["validation"]) >= 4


SPEED_OPTIONS = {
    # Compiled training must give the eager loss up to float32 rounding.
    "compile": (["--torch_compile"], 1e-3),
    # bf16 autocast rounds the matmuls, so a few steps drift by a few thousandths.
    "bf16_checkpointing": (["--bf16", "--use_cpu", "--activation_checkpointing"], 5e-2),
}


@pytest.fixture(scope="module")
def eager_train_loss(tmp_path_factory, kjv_dir):
    tmp_path = tmp_path_factory.mktemp("eager")
    run_script(speed_run_args(kjv_dir, tmp_path / "out"), tmp_path)
    return json.loads((tmp_path / "out" / "train_results.json").read_text())["train_loss"]


def speed_run_args(kjv_dir, output_dir):
    return [
        "--data_file", str(kjv_dir / "validation.txt"), "--output_dir", str(output_dir), *TINY_MODEL,
        "--batch_size", "4", "--max_steps", "4", "--eval_strategy", "no", "--do_eval", "False", "--save_steps", "4",
    ]


@pytest.mark.parametrize("option", sorted(SPEED_OPTIONS))
def test_speed_options_train_like_eager(option, tmp_path, kjv_dir, eager_train_loss):
    flags, tolerance = SPEED_OPTIONS[option]
    output_dir = tmp_path / "out"
    run_script([*speed_run_args(kjv_dir, output_dir), *flags], tmp_path)

    train_loss = json.loads((output_dir / "train_results.json").read_text())["train_loss"]
    assert abs(train_loss - eager_train_loss) < tolerance, (train_loss, eager_train_loss)

    # The saved weights are the plain model's: no torch.compile prefix, float32 after bf16 autocast.
    with safe_open(output_dir / "model.safetensors", "pt") as weights:
        names = list(weights.keys())
        dtypes = {weights.get_tensor(name).dtype for name in names}
    assert "model.embed_tokens.weight" in names
    assert not any("_orig_mod" in name for name in names)
    assert dtypes == {torch.float32}


def test_document_attention_flag_trains_and_saves(tmp_path, kjv_dir):
    # One sentence per document, so every 64-token block packs several documents.
    text = (kjv_dir / "validation.txt").read_text()
    sentences = [sentence.strip() for sentence in text.replace("\n", " ").split(". ") if sentence.strip()]
    data_file = tmp_path / "sentences.txt"
    data_file.write_text("\n\n".join(sentences[:600]))

    train_losses = {}
    for flags in ([], ["--document_attention"]):
        output_dir = tmp_path / f"out{len(flags)}"
        args = speed_run_args(kjv_dir, output_dir)
        args[args.index("--data_file") + 1] = str(data_file)
        run_script([*args, *flags], tmp_path)
        train_losses[tuple(flags)] = json.loads((output_dir / "train_results.json").read_text())["train_loss"]

    config = json.loads((tmp_path / "out1" / "config.json").read_text())
    assert config["document_attention"] is True
    assert abs(train_losses[("--document_attention",)] - train_losses[()]) > 1e-3, train_losses
