"""A tiny model of Phi-4-mini-instruct's architecture and tokenizer, built offline, for runs without the Hub.

microsoft/Phi-4-mini-instruct loads as the same Phi3ForCausalLM as Phi-3.5-mini, but with partial rotary
embeddings (partial_rotary_factor 0.75), grouped-query attention, tied input and output embeddings, an
o200k-based 200,064-token vocabulary with other special tokens, and a chat template without newlines.
This builds a small model with those traits (random weights) and a byte-level BPE trained here on the
sample chats carrying Phi-4-mini's special tokens and chat template, into a folder that loads with
`AutoModelForCausalLM` / `AutoTokenizer`, like a Hub id.

    python -m stand_ins.tiny_phi4 --out outputs/tiny-phi4
"""

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerFast

from finetuning_dir.chat_templates import PHI4_MINI as PHI4_MINI_CHAT_TEMPLATE
from stand_ins.tiny_phi3 import training_corpus

# Where local runs build it (make local MODEL=phi4).
TINY_MODEL_DIR = Path(__file__).resolve().parents[1] / "outputs" / "tiny-phi4"
# Phi-4-mini's special tokens, in its order; <|endoftext|> is its bos, eos, pad and unknown token.
SPECIAL_TOKENS = ["<|endoftext|>", "<|endofprompt|>", "<|assistant|>", "<|end|>", "<|user|>", "<|system|>",
                  "<|tool|>", "<|/tool|>", "<|tool_call|>", "<|/tool_call|>", "<|tool_response|>", "<|tag|>"]


def build_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(training_corpus(), trainer=trainer)
    end = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=end, eos_token=end, unk_token=end, pad_token=end,
                                   chat_template=PHI4_MINI_CHAT_TEMPLATE, model_max_length=4096, padding_side="left")


def build_model(tokenizer: PreTrainedTokenizerFast, hidden_size: int = 128, layers: int = 2, seed: int = 0):
    import torch

    torch.manual_seed(seed)
    end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Phi3Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 3,
        num_hidden_layers=layers,
        # Grouped-query attention, as Phi-4-mini's 24 heads on 8 KV heads. Heads of 64 dimensions: onnxruntime-genai's
        # attention needs the rotary half-width (here 24) to be a multiple of 8 and at most a quarter of a head.
        num_attention_heads=hidden_size // 64, num_key_value_heads=max(1, hidden_size // 128),
        partial_rotary_factor=0.75,  # rotary embeddings on 3/4 of each head's dimensions
        tie_word_embeddings=True,  # the output layer is the input embedding
        max_position_embeddings=4096, original_max_position_embeddings=4096,
        bos_token_id=end, eos_token_id=end, pad_token_id=end,
    )
    model = Phi3ForCausalLM(config)
    # As in Phi-4-mini's generation_config.json: stop at <|end|> or <|endoftext|>.
    model.generation_config = GenerationConfig(bos_token_id=end, pad_token_id=end,
                                               eos_token_id=tokenizer.convert_tokens_to_ids(["<|end|>", "<|endoftext|>"]))
    return model


def build(out: Path, hidden_size: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny Phi-4-mini-shaped model and tokenizer to `out` and return it."""
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=hidden_size, layers=layers, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("outputs/tiny-phi4"), help="folder to write the model to")
    parser.add_argument("--hidden-size", type=int, default=128, help="hidden size, a multiple of 64 (default 128)")
    parser.add_argument("--layers", type=int, default=2, help="number of decoder layers (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    path = build(args.out, hidden_size=args.hidden_size, layers=args.layers, seed=args.seed)
    print(f"Wrote a tiny Phi-4-mini-shaped model and tokenizer to {path}")


if __name__ == "__main__":
    main()
