"""download_dataset.py: loading, checking, splitting and atomically writing the chat data."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset

import download_dataset
from conftest import ROOT, one_line_naming, options_without_help, run_main, run_script, write_jsonl
from stand_ins import sample_chats

SCRIPT = ROOT / "download_dataset.py"


def run(args, cwd):
    """download_dataset.py's main() in this process; the first two tests run the command itself."""
    return run_main(download_dataset.main, args, cwd)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def sample_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chats.jsonl", sample_chats.make_rows(50, seed=3))


def test_local_jsonl_is_split_80_20_into_the_config_paths(tmp_path, sample_file):
    result = run_script([SCRIPT, "--dataset", sample_file, "--split", "train"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    train, test = read_jsonl(tmp_path / "data/train_data.jsonl"), read_jsonl(tmp_path / "data/test_data.jsonl")
    assert (len(train), len(test)) == (40, 10)
    assert "Train dataset size: 40" in result.stdout and "Test dataset size: 10" in result.stdout
    all_rows = sorted(json.dumps(r, sort_keys=True) for r in read_jsonl(sample_file))
    assert sorted(json.dumps(r, sort_keys=True) for r in train + test) == all_rows
    assert set(train[0]) == {"prompt", "prompt_id", "messages"}
    assert not list((tmp_path / "data").glob(".*partial")), "no temporary file is left behind"


def test_config_paths_come_from_the_environment(tmp_path, sample_file):
    env = {"TRAIN_DATA_PATH": "out/a.jsonl", "TEST_DATA_PATH": "out/b.jsonl"}
    result = run_script([SCRIPT, "--dataset", sample_file, "--split", "train"], cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out/a.jsonl").exists() and (tmp_path / "out/b.jsonl").exists()


def test_tutorial_split_expression_slices_a_local_file(tmp_path, sample_file):
    # The tutorial's CPU tip, train_sft[:10], means the first 10 rows of a local file too.
    result = run(["--dataset", sample_file, "--split", "train_sft[:10]"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = read_jsonl(tmp_path / "data/train_data.jsonl") + read_jsonl(tmp_path / "data/test_data.jsonl")
    assert len(rows) == 10
    assert {json.dumps(r) for r in rows} == {json.dumps(r) for r in read_jsonl(sample_file)[:10]}


def test_local_dataset_folder_with_hub_layout(tmp_path):
    # A clone of the Hub repo: data/<split>-*.parquet files, loaded with the split expression.
    folder = tmp_path / "ultrachat_200k"
    (folder / "data").mkdir(parents=True)
    Dataset.from_list(sample_chats.make_rows(200, seed=1)).to_parquet(folder / "data/train_sft-00000-of-00001.parquet")
    Dataset.from_list(sample_chats.make_rows(20, seed=2)).to_parquet(folder / "data/test_sft-00000-of-00001.parquet")
    result = run(["--dataset", folder], cwd=tmp_path)  # default split train_sft[:1%]
    assert result.returncode == 0, result.stderr
    assert "Original dataset size: 2" in result.stdout
    result = run(["--dataset", folder, "--split", "train_sft[:50%]"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len(read_jsonl(tmp_path / "data/train_data.jsonl")) == 80


def test_seed_makes_the_split_reproducible(tmp_path, sample_file):
    def split_with(seed):
        result = run(["--dataset", sample_file, "--split", "train", "--seed", seed], cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        return (tmp_path / "data/test_data.jsonl").read_text()

    first, again, other = split_with("7"), split_with("7"), split_with("8")
    assert first == again
    assert first != other


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": "hi"}\n', "line 2 has no 'messages' list"),
        ('{"messages": [{"role": "user", "content": 5}]}\n', "line 1 message 0 has content that is not text"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n', "line 2 is not valid JSON"),
    ],
)
def test_bad_rows_are_named_and_earlier_files_kept(tmp_path, sample_file, content, expected):
    assert run(["--dataset", sample_file, "--split", "train"], cwd=tmp_path).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()}

    bad = tmp_path / "bad.jsonl"
    bad.write_text(content)
    result = run(["--dataset", bad], cwd=tmp_path)
    assert result.returncode != 0
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == before


def test_bad_row_in_a_dataset_folder_is_named_by_index(tmp_path):
    rows = sample_chats.make_rows(10, seed=0)
    rows[6]["messages"] = []
    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    Dataset.from_list(rows).to_parquet(folder / "data/train_sft-00000-of-00001.parquet")
    result = run(["--dataset", folder, "--split", "train_sft"], cwd=tmp_path)
    assert result.returncode != 0
    assert "row 6 has no 'messages' list" in result.stderr
    assert not (tmp_path / "data").exists()


def test_failure_while_writing_keeps_earlier_files(tmp_path, sample_file, monkeypatch):
    monkeypatch.chdir(tmp_path)
    download_dataset.main(["--dataset", str(sample_file), "--split", "train"])
    before = {p: p.read_bytes() for p in (tmp_path / "data").iterdir()}

    def rows_then_disk_full():
        yield {"messages": [{"role": "user", "content": "hi"}]}
        raise OSError("disk full")

    new_rows = [{"messages": [{"role": "user", "content": "new"}]}]
    with pytest.raises(OSError, match="disk full"):
        download_dataset.save_splits(
            [(new_rows, "data/train_data.jsonl"), (rows_then_disk_full(), "data/test_data.jsonl")]
        )
    # Neither file was replaced, and no temporary file is left behind.
    assert {p: p.read_bytes() for p in (tmp_path / "data").iterdir()} == before


def test_unreachable_hub_suggests_dataset_flag(tmp_path):
    result = run([], cwd=tmp_path)  # HF_HUB_OFFLINE=1 stands in for no network
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    one_line_naming(line, "'HuggingFaceH4/ultrachat_200k'", "Hugging Face Hub", "--dataset", ".jsonl")
    assert "Traceback" not in result.stderr


def test_missing_local_file_and_too_few_rows(tmp_path, sample_file):
    result = run(["--dataset", "nope.jsonl"], cwd=tmp_path)
    one_line_naming(result.stderr, "download_dataset.py", "nope.jsonl", "no such file")
    result = run(["--dataset", sample_file, "--split", "train[:1]"], cwd=tmp_path)
    assert "1 row(s) cannot be split; load at least 2" in result.stderr
    assert result.returncode != 0
    # The default 1% of a 50-row file is no rows at all: say which flag fixes it.
    result = run(["--dataset", sample_file], cwd=tmp_path)
    assert "corresponds to no data" in result.stderr and "a whole local file is --split train" in result.stderr


def test_help_explains_every_flag():
    result = run(["--help"], cwd=ROOT)
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr
    assert options_without_help(download_dataset.main) == []
    assert os.linesep + "    python download_dataset.py --split" in result.stdout


@pytest.mark.parametrize("first, then", [("chat_data", "finetuning_dir.chat_data"),
                                         ("finetuning_dir.chat_data", "chat_data")])
def test_chat_data_is_one_module_whichever_name_imports_it_first(first, then):
    # fine_tune.py imports `chat_data` (its folder is the job's), the project's scripts `finetuning_dir.chat_data`:
    # an error one raises, the other catches.
    code = (f"import importlib, sys; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/finetuning_dir']\n"
            f"raising, catching = importlib.import_module('{first}'), importlib.import_module('{then}')\n"
            "try:\n    raising.check_rows([], 'chats.jsonl')\nexcept catching.ChatDataError as e:\n    print('caught', e)")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT)], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "caught chats.jsonl: has no rows", result.stderr[-2000:]
