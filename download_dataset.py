"""Step 1: download the fine-tuning data and split it into train and test JSONL files.

By default this is the tutorial's data: 1% of HuggingFaceH4/ultrachat_200k's `train_sft` split,
split 80/20 into TRAIN_DATA_PATH and TEST_DATA_PATH (see config.py). `--dataset` also takes a
local dataset folder or a local .jsonl/.json/.parquet file of ultrachat-shaped rows, and
`--split` any split expression (the tutorial's CPU tip is `--split "train_sft[:10]"`).

Every row is checked to hold `messages` as a list of {role, content}. Both files are written
to temporary files first and moved into place only when both are complete, so a failed run
leaves earlier files as they were.

    python download_dataset.py
    python download_dataset.py --split "train_sft[:10]"
    python download_dataset.py --dataset data/sample_chats.jsonl --split train
"""

import argparse
import json
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field

from datasets import load_dataset
from datasets.exceptions import DatasetGenerationError
from transformers import HfArgumentParser

from config import TEST_DATA_PATH, TRAIN_DATA_PATH
from finetuning_dir.chat_data import ChatDataError, check_jsonl_file, check_rows

class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keep the docstring's line breaks and show each flag's default."""


FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass
class DownloadArguments:
    dataset: str = field(
        default="HuggingFaceH4/ultrachat_200k",
        metadata={"help": "A Hugging Face Hub dataset id, a local dataset folder, or a local .jsonl/.json/.parquet file."},
    )
    config_name: str = field(default="default", metadata={"help": "Dataset configuration (Hub datasets only)."})
    split: str = field(
        default="train_sft[:1%]",
        metadata={"help": "Split expression to load, e.g. 'train_sft[:10]'; a local file's only split is 'train'."},
    )
    test_size: float = field(default=0.2, metadata={"help": "Fraction of the rows that goes to the test file."})
    seed: int = field(default=42, metadata={"help": "Seed of the train/test shuffle: the same seed gives the same files."})
    train_path: str = field(default=TRAIN_DATA_PATH, metadata={"help": "Train JSONL to write (config TRAIN_DATA_PATH)."})
    test_path: str = field(default=TEST_DATA_PATH, metadata={"help": "Test JSONL to write (config TEST_DATA_PATH)."})


def load_rows(dataset, config_name, split):
    """Load one split of a Hub dataset, a local dataset folder, or a local data file."""
    extension = os.path.splitext(dataset)[1].lower()
    if os.path.isfile(dataset):
        if extension not in FILE_BUILDERS:
            raise ChatDataError(f"{dataset}: unknown file type; use a .jsonl, .json or .parquet file")
        if extension == ".jsonl":
            check_jsonl_file(dataset)  # names the bad line, where datasets' own error would not
        # A single data file has one split, "train": keep any slice of the asked-for split.
        file_split = re.sub(r"^[^\[]*", "train", split)
        return load_dataset(FILE_BUILDERS[extension], data_files=dataset, split=file_split)
    if os.path.isdir(dataset):
        return load_dataset(dataset, split=split)
    if extension in FILE_BUILDERS or dataset.startswith((".", "/")):
        raise ChatDataError(f"{dataset}: no such file or folder")
    return load_dataset(dataset, config_name, split=split)


def load_and_split_dataset(dataset_name, config_name, split_ratio, test_size=0.2, seed=42):
    """
    Load and split a dataset.
    """
    dataset = load_rows(dataset_name, config_name, split_ratio)
    print(f"Original dataset size: {len(dataset)}")
    check_rows(((f"row {i}", row) for i, row in enumerate(dataset)), f"{dataset_name} [{split_ratio}]")
    if len(dataset) < 2:
        raise ChatDataError(f"{dataset_name} [{split_ratio}]: {len(dataset)} row(s) cannot be split; load at least 2")

    split_dataset = dataset.train_test_split(test_size=test_size, seed=seed)
    print(f"Train dataset size: {len(split_dataset['train'])}")
    print(f"Test dataset size: {len(split_dataset['test'])}")
    return split_dataset


def write_jsonl_to_temp(dataset, filepath):
    """Write a dataset as JSONL into a temporary file beside `filepath`; return the temp path."""
    directory = os.path.dirname(filepath) or "."
    os.makedirs(directory, exist_ok=True)
    fd, temp_path = tempfile.mkstemp(dir=directory, prefix=".", suffix=".partial")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in dataset:
                f.write(json.dumps(record) + "\n")
    except BaseException:
        os.remove(temp_path)
        raise
    return temp_path


def save_splits(splits):
    """Write each (dataset, path) pair; no target is replaced until every file is complete."""
    temp_paths = []
    try:
        for dataset, path in splits:
            temp_paths.append(write_jsonl_to_temp(dataset, path))
    except BaseException:
        for temp_path in temp_paths:
            os.remove(temp_path)
        raise
    for temp_path, (_, path) in zip(temp_paths, splits):
        os.replace(temp_path, path)
        print(f"Dataset saved to {path}")


def hub_error_message(args, error) -> str:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"download_dataset.py: could not load '{args.dataset}' from the Hugging Face Hub ({reason}); "
        "check your connection, or pass --dataset with a local dataset folder or a .jsonl/.parquet file"
    )


def main(argv=None):
    """
    Main function to load, split, and save the dataset.
    """
    parser = HfArgumentParser(DownloadArguments, description=__doc__, formatter_class=HelpFormatter)
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    try:
        dataset = load_and_split_dataset(args.dataset, args.config_name, args.split, args.test_size, args.seed)
    except ChatDataError as e:
        sys.exit(f"download_dataset.py: {e}")
    except (ConnectionError, OSError) as e:
        sys.exit(hub_error_message(args, e))
    except (ValueError, DatasetGenerationError) as e:  # e.g. a bad split expression, an unreadable file
        reason = f"{e}: {e.__cause__}" if e.__cause__ else str(e)
        hint = "; pick another --split (a whole local file is --split train)" if "split" in reason.lower() or "instruction" in reason.lower() else ""
        sys.exit(f"download_dataset.py: {args.dataset}: {reason.splitlines()[0]}{hint}")
    save_splits([(dataset["train"], args.train_path), (dataset["test"], args.test_path)])


if __name__ == "__main__":
    main()
