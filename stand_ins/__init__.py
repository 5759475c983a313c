"""Stand-ins for what the tutorial fetches from the Hugging Face Hub: a tiny Phi-3 model with
Phi-3.5's tokenizer behaviour and chat template, and ultrachat-shaped sample chats. They let the
pipeline, its tests and its benchmarks run with no Hub; no product code depends on them except
the local and rehearsal runs, which build the tiny model on purpose."""
