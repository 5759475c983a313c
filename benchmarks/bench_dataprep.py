"""Data preparation: fine_tune.py's chat-template map with the tutorial's num_proc=10 against the project's.

It times fine_tune.py's own `load_and_preprocess_data` (load both JSONL files with `datasets`, apply the
Phi-3 chat template to every conversation) at the size of the tutorial's 1% subset of ultrachat_200k
(~2,080 conversations, split 80/20; synthetic rows, benchmarks/common.py), and the map alone on an
in-memory dataset. Each num_proc ("None": one process, no pool) runs from an empty datasets cache (as
in a fresh Azure ML job), interleaved with the others and repeated; the figures are medians.

    python benchmarks/bench_dataprep.py                   # num_proc 10 vs fine_tune.py's default vs all cores
    python benchmarks/bench_dataprep.py --num-proc 10,none,1,2 --repeats 5
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import common  # noqa: E402  (first: it keeps tool state under .scratch/bench)

import datasets  # noqa: E402

import fine_tune as ft  # noqa: E402  (finetuning_dir/fine_tune.py)
from stand_ins.sample_chats import write_jsonl  # noqa: E402
from stand_ins.tiny_phi3 import build_tokenizer  # noqa: E402

TUTORIAL_NUM_PROC = 10
SUBSET_ROWS = 2080  # 1% of train_sft's 207,865 conversations, rounded up as datasets' slicing does


def parse_args(argv=None):
    """The command line; every flag's help says what it changes."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    flag = parser.add_argument
    flag("--num-proc", default="10,default,cores", help="comma-separated candidates: a number, none (one process), "
                                                        "default (FineTuneArguments') or cores (os.cpu_count())")
    flag("--rows", type=int, default=SUBSET_ROWS, help="conversations, split 80/20 (default: the 1%% subset's 2,080)")
    flag("--repeats", type=int, default=3, help="interleaved repetitions of each candidate")
    return parser.parse_args(argv)


def main(argv=None):
    """Time each candidate, interleaved; print the table and the RESULT line."""
    opts = parse_args(argv)
    default = ft.FineTuneArguments().num_proc
    named = {"default": default, "none": None, "cores": os.cpu_count()}
    candidates = list(dict.fromkeys(named[v] if v in named else int(v) for v in opts.num_proc.lower().split(",")))
    tokenizer, cut = build_tokenizer(), int(opts.rows * 0.8)
    common.print_header("Data preparation (fine_tune.load_and_preprocess_data)", {
        **vars(opts), "train_rows": cut, "test_rows": opts.rows - cut, "candidates_num_proc": candidates,
        "tutorial_num_proc": TUTORIAL_NUM_PROC, "fine_tune_default_num_proc": default,
        "tokenizer": "tiny Phi-3 tokenizer with Phi-3.5's chat template",
    })

    rows = common.synthetic_chats(opts.rows, seed=0)
    times, map_times = {c: [] for c in candidates}, {c: [] for c in candidates}
    with tempfile.TemporaryDirectory(dir=common.SCRATCH) as tmp:
        work = Path(tmp)
        train = write_jsonl(rows[:cut], work / "train.jsonl")
        test = write_jsonl(rows[cut:], work / "test.jsonl")
        in_memory = datasets.Dataset.from_list(rows[:cut])
        for repeat in range(opts.repeats):
            for num_proc in candidates if repeat % 2 == 0 else candidates[::-1]:
                # A fresh cache each time: no run may reuse another's Arrow files or map results.
                datasets.config.HF_DATASETS_CACHE = tempfile.mkdtemp(dir=work)
                start = time.perf_counter()
                train_ds, _ = ft.load_and_preprocess_data(str(train), str(test), tokenizer, num_proc)
                times[num_proc].append(time.perf_counter() - start)
                assert all(f["filename"].startswith(datasets.config.HF_DATASETS_CACHE) for f in train_ds.cache_files)
                start = time.perf_counter()
                in_memory.map(ft.apply_chat_template, fn_kwargs={"tokenizer": tokenizer}, num_proc=num_proc,
                              remove_columns=in_memory.column_names)
                map_times[num_proc].append(time.perf_counter() - start)
                print(f"num_proc={num_proc}: load+map {times[num_proc][-1]:.2f} s, map alone "
                      f"{map_times[num_proc][-1]:.2f} s, load {os.getloadavg()[0]:.2f}", flush=True)

    table = []
    for num_proc in candidates:
        median = statistics.median(times[num_proc])
        table.append({
            "num_proc": num_proc,
            "role": ", ".join(r for r, v in (("tutorial", TUTORIAL_NUM_PROC), ("fine_tune default", default))
                              if v == num_proc) or "-",
            "load_map_s_median": median, "load_map_s_min": min(times[num_proc]),
            "map_alone_s_median": statistics.median(map_times[num_proc]), "rows_per_s": opts.rows / median,
        })
        if TUTORIAL_NUM_PROC in times:
            table[-1]["speedup_vs_tutorial"] = statistics.median(times[TUTORIAL_NUM_PROC]) / median
    common.print_table(table, ["num_proc", "role", "load_map_s_median", "load_map_s_min", "map_alone_s_median",
                               "rows_per_s", "speedup_vs_tutorial"])
    fastest = min(table, key=lambda e: e["load_map_s_median"])
    common.emit_json("dataprep", {"table": table, "fastest_num_proc": fastest["num_proc"]})


if __name__ == "__main__":
    main()
