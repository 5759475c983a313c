"""Ultrachat-shaped sample conversations, made on the spot when the Hub cannot be reached.

Rows have the schema of HuggingFaceH4/ultrachat_200k (`prompt`, `prompt_id`, `messages` as a
list of {role, content}), so every script treats them exactly like the real subset. The
answers are a small set of facts phrased a few ways, so that a tiny model fine-tuned on them
visibly learns something.

    python -m stand_ins.sample_chats --rows 400 --out data/sample_chats.jsonl
"""

import argparse
import hashlib
import json
import random
from pathlib import Path

FACTS = [
    ("Who founded Microsoft?", "Microsoft was founded by Bill Gates and Paul Allen in 1975."),
    ("What is Phi-3?", "Phi-3 is a family of small language models made by Microsoft."),
    ("What is Azure Machine Learning?", "Azure Machine Learning is a cloud service to train and deploy models."),
    ("What is Prompt flow?", "Prompt flow is a tool to build, test and serve flows around language models."),
    ("What does fine-tuning do?", "Fine-tuning trains a pretrained model further on your own examples."),
    ("What is LoRA?", "LoRA trains small low-rank adapters instead of every weight of the model."),
    ("What is a managed online endpoint?", "It is an Azure service that hosts a model behind a scoring URL."),
    ("What GPU does the tutorial use?", "The tutorial fine-tunes on a Standard_NC24ads_A100_v4 with one A100 GPU."),
    ("What data set does the tutorial use?", "It uses one percent of the ultrachat_200k conversations."),
    ("Where is Microsoft based?", "Microsoft is based in Redmond, Washington."),
]

OPENERS = ["", "Please tell me: ", "Quick question. ", "I wonder, ", "Can you answer this? "]
FOLLOW_UPS = [
    ("Can you say that in one word?", "Sure."),
    ("Thanks!", "You are welcome."),
    ("Is that right?", "Yes, that is right."),
]


def make_row(rng: random.Random) -> dict:
    question, answer = rng.choice(FACTS)
    prompt = rng.choice(OPENERS) + question
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
    if rng.random() < 0.3:
        follow_up, reply = rng.choice(FOLLOW_UPS)
        messages += [{"role": "user", "content": follow_up}, {"role": "assistant", "content": reply}]
    return {
        "prompt": prompt,
        "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
        "messages": messages,
    }


def make_rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [make_row(rng) for _ in range(count)]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400, help="how many conversations to write (default 400)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same file")
    parser.add_argument("--out", type=Path, default=Path("data/sample_chats.jsonl"), help="JSONL file to write")
    args = parser.parse_args(argv)
    path = write_jsonl(make_rows(args.rows, args.seed), args.out)
    print(f"Wrote {args.rows} sample conversations to {path}")


if __name__ == "__main__":
    main()
