"""A tiny Phi-3-architecture model and tokenizer, built offline, for runs without the Hub.

The model is transformers' own Phi3ForCausalLM (the class microsoft/Phi-3.5-mini-instruct
loads as) from a small config with random weights. The tokenizer is a byte-level BPE trained
here on the sample chats, carrying Phi-3.5-mini's special tokens and chat template, so chat
formatting, padding and stopping at `<|end|>` behave as with the real model. The folder it
writes loads with `AutoModelForCausalLM` / `AutoTokenizer`, like a Hub id.

    python -m stand_ins.tiny_phi3 --out outputs/tiny-phi3
"""

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

from stand_ins.sample_chats import FACTS, FOLLOW_UPS, OPENERS

# Phi-3.5-mini-instruct's chat template, verbatim.
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and message['content'] %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}"
    "{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
# Where setup_ml.py --local builds it when no --model-name is given.
TINY_MODEL_DIR = Path(__file__).resolve().parents[1] / "outputs" / "tiny-phi3"
# fine_tune.py flags under which the tiny model memorises the sample facts, and which follow-up
# gets which reply, in ~30 s on a CPU (at 15 epochs it still mixes up the follow-ups). These flags
# are for exact answers only: the tutorial's lr 5e-6 for 3 epochs barely moves a model this small.
TINY_TRAINING_FLAGS = ["--learning-rate", "1e-2", "--epochs", "25", "--max-length", "256", "--warmup", "0.05"]
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|system|>", "<|end|>", "<|user|>"]


def training_corpus() -> list[str]:
    """Text the tokenizer learns its merges from: the sample chats' words and some English."""
    texts = [q + " " + a for q, a in FACTS] + [q + " " + a for q, a in FOLLOW_UPS] + OPENERS
    texts.append("The quick brown fox jumps over the lazy dog. 0123456789 ?!.,:;'\"()-")
    return texts


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(training_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        chat_template=PHI3_CHAT_TEMPLATE,
        model_max_length=4096,
        padding_side="left",
    )


def build_model(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, layers: int = 2, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    config = Phi3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        # 3x, not 2x: onnxruntime-genai's model builder (0.18) converts a Phi-3 MLP exactly twice as wide
        # as the model wrongly from width 128 on; Phi-3.5-mini's own ratio (8192/3072) converts exactly.
        intermediate_size=hidden_size * 3,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = Phi3ForCausalLM(config)
    # As in Phi-3.5-mini's generation_config.json: stop at <|end|>, <|assistant|> or <|endoftext|>.
    ends = ["<|end|>", "<|assistant|>", "<|endoftext|>"]
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids(ends),
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def build(out: Path, hidden_size: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny Phi-3 model and tokenizer to `out` and return it."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=hidden_size, layers=layers, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/tiny-phi3"), help="folder to write the model to")
    parser.add_argument("--hidden-size", type=int, default=64, help="hidden size (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="number of decoder layers (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    path = build(args.out, hidden_size=args.hidden_size, layers=args.layers, seed=args.seed)
    print(f"Wrote a tiny Phi-3 model and tokenizer to {path}")


if __name__ == "__main__":
    main()
