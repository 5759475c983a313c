"""Data preparation: fine_tune.py's chat-template map with the tutorial's num_proc=10 vs the project's.

It times finetuning_dir/fine_tune.py's own `load_and_preprocess_data` (load both JSONL files with
`datasets`, apply the Phi-3 chat template to every conversation) on the tutorial's data size: the
1% subset of ultrachat_200k's train_sft (~2,080 conversations, split 80/20), as synthetic rows of a
similar length distribution (benchmarks/common.py: synthetic_chats). Each candidate num_proc runs
from an empty datasets cache (as in a fresh Azure ML job container), interleaved with the others
and repeated; the figure is the median wall time. "None" is a single process, no pool.

It also times the map alone on an in-memory dataset, without loading or cache writes.

    python benchmarks/bench_dataprep.py                      # num_proc 10 vs the default vs all cores
    python benchmarks/bench_dataprep.py --num-proc 10,none,1,2 --rows 2080 --repeats 5
"""

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402
from stand_ins.sample_chats import write_jsonl  # noqa: E402

TUTORIAL_NUM_PROC = 10
SUBSET_ROWS = 2080  # 1% of train_sft's 207,865 conversations, rounded up as datasets' slicing does


def parse_num_proc(text: str, default) -> list:
    values = []
    for item in filter(None, (s.strip().lower() for s in text.split(","))):
        if item == "default":
            value = default
        elif item == "none":
            value = None
        elif item == "cores":
            value = os.cpu_count()
        else:
            value = int(item)
        if value not in values:
            values.append(value)
    return values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-proc", default="10,default,cores",
                        help="comma-separated candidates: a number, none (one process), default (FineTuneArguments' "
                             "num_proc) or cores (os.cpu_count()); repeated values are measured once")
    parser.add_argument("--rows", type=int, default=SUBSET_ROWS,
                        help="conversations in all, split 80/20 into train and test (default: the 1%% subset, 2,080)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of each candidate")
    return parser.parse_args(argv)


def main(argv=None):
    opts = parse_args(argv)
    common.setup_env()

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    import fine_tune as ft  # finetuning_dir/fine_tune.py

    default = ft.FineTuneArguments().num_proc
    candidates = parse_num_proc(opts.num_proc, default)
    tokenizer = transformers.AutoTokenizer.from_pretrained(common.tiny_model())
    common.print_header("Data preparation (fine_tune.load_and_preprocess_data)", {
        "rows": opts.rows, "train_rows": int(opts.rows * 0.8), "test_rows": opts.rows - int(opts.rows * 0.8),
        "repeats": opts.repeats, "candidates_num_proc": candidates, "tutorial_num_proc": TUTORIAL_NUM_PROC,
        "fine_tune_default_num_proc": default, "tokenizer": "tiny Phi-3 tokenizer with Phi-3.5's chat template",
    })

    rows = common.synthetic_chats(opts.rows, seed=0)
    cut = int(opts.rows * 0.8)
    times = {c: [] for c in candidates}
    map_times = {c: [] for c in candidates}
    with tempfile.TemporaryDirectory(dir=common.SCRATCH) as tmp:
        work = Path(tmp)
        train = write_jsonl(rows[:cut], work / "train.jsonl")
        test = write_jsonl(rows[cut:], work / "test.jsonl")
        in_memory = datasets.Dataset.from_list(rows[:cut])
        run = 0
        for repeat in range(opts.repeats):
            order = candidates if repeat % 2 == 0 else candidates[::-1]
            for num_proc in order:
                run += 1
                # A fresh cache each time: no run may reuse another's Arrow files or map results.
                datasets.config.HF_DATASETS_CACHE = str(work / f"cache-{run}")
                with common.timed() as elapsed:
                    train_ds, test_ds = ft.load_and_preprocess_data(str(train), str(test), tokenizer, num_proc)
                times[num_proc].append(elapsed())
                cache_files = [f["filename"] for f in train_ds.cache_files]
                assert cache_files and all(f.startswith(datasets.config.HF_DATASETS_CACHE) for f in cache_files), (
                    "the datasets cache was not fresh", cache_files)
                assert len(train_ds) == cut and len(test_ds) == opts.rows - cut
                assert train_ds.column_names == ["text"] and train_ds[0]["text"].startswith("<|user|>")
                with common.timed() as elapsed:
                    in_memory.map(ft.apply_chat_template, fn_kwargs={"tokenizer": tokenizer}, num_proc=num_proc,
                                  remove_columns=in_memory.column_names)
                map_times[num_proc].append(elapsed())
                print(f"run {run}: num_proc={num_proc}: load+map {times[num_proc][-1]:.2f} s, "
                      f"map alone {map_times[num_proc][-1]:.2f} s, load {os.getloadavg()[0]:.2f}", flush=True)

    table = []
    baseline = common.median(times[TUTORIAL_NUM_PROC]) if TUTORIAL_NUM_PROC in times else None
    for num_proc in candidates:
        entry = {
            "num_proc": num_proc,
            "role": ", ".join(r for r, v in (("tutorial", TUTORIAL_NUM_PROC), ("fine_tune default", default))
                              if v == num_proc) or "-",
            "load_map_s_median": common.median(times[num_proc]),
            "load_map_s_min": min(times[num_proc]),
            "map_alone_s_median": common.median(map_times[num_proc]),
            "rows_per_s": opts.rows / common.median(times[num_proc]),
        }
        if baseline:
            entry["speedup_vs_tutorial"] = baseline / entry["load_map_s_median"]
        table.append(entry)
    print()
    common.print_table(table, ["num_proc", "role", "load_map_s_median", "load_map_s_min", "map_alone_s_median",
                               "rows_per_s", "speedup_vs_tutorial"])
    fastest = min(table, key=lambda e: e["load_map_s_median"])
    print(f"fastest: num_proc={fastest['num_proc']}; loadavg after: {[round(x, 2) for x in os.getloadavg()]}")
    common.emit_json("dataprep", {"table": table, "fastest_num_proc": fastest["num_proc"]})
    return table


if __name__ == "__main__":
    main()
