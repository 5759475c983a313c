"""Keep bfd-packed rows apart: TRL's bfd packing without the padding-free flattening.

With `packing_strategy="bfd"` TRL packs whole conversations into rows (best-fit decreasing) and
then makes the batch padding-free: its rows are flattened into one row of batch x max_length
tokens. flash_attention_2 reads the conversation boundaries from that row cheaply, but sdpa and
eager build one (batch x max_length)^2 mask: batch times the attention work of separate rows
(benchmarks/bench_finetune.py measured the default 2.3x slower on a CPU). This collator hands
the same packed rows over as a [batch, longest row] batch instead, with position_ids restarting
at each conversation and no attention mask, from which transformers masks attention to each
conversation. Tokens, targets and attention pattern are bfd's, so it trains the same model
(tests/test_fine_tune.py checks the losses are equal).
"""

import torch
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling


class PerRowPackedCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id
        self.last_spans = None  # the last batch's conversation lengths (the benchmark counts attention work)

    def __call__(self, examples):
        positions = DataCollatorForLanguageModeling.get_position_ids_from_packed_seq_lengths(
            [e["seq_lengths"] for e in examples]
        )
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        position_ids = torch.zeros((len(examples), width), dtype=torch.long)
        for i, (example, position) in enumerate(zip(examples, positions)):
            n = len(example["input_ids"])
            input_ids[i, :n] = torch.as_tensor(example["input_ids"])
            labels[i, :n] = torch.as_tensor(example.get("labels", example["input_ids"]))
            position_ids[i, :n] = position
        # As TRL's padding-free batches: no target across a conversation boundary. Padding has
        # position 0 and label -100: a one-token sequence of its own that adds no loss.
        labels[position_ids == 0] = -100
        self.last_spans = [s for e in examples for s in e["seq_lengths"]]
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
