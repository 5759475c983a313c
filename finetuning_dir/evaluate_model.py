"""How much a fine-tune learned: test loss and a few answers, from the base model and the tuned one.

fine_tune.py runs this evaluation on the base model before training and on the fine-tuned model
after it, in every run: the test loss (the trainer's own eval_loss over the eval file) with its
perplexity, and greedy answers to the first few questions of the eval file, side by side. It logs
them to MLflow (base_eval_loss / eval_loss, base_eval_perplexity / eval_perplexity, and the table
eval_answers.json) and ends with one line, e.g.

    test loss 1.421 → 1.183 (perplexity 4.14 → 3.26)

Run on its own, it evaluates any model folder fine_tune.py wrote, its int4 form
(quantize_model.py), a base model (a Hub id or a local folder), or two of them against each
other, on any ultrachat-shaped chat JSONL. Two models are also compared conversation by
conversation: each test conversation's loss under both, in one table (means, difference, 95%
interval, p-value, won/tied/lost; paired.py), the row that shows what fine-tuning changed:

    python finetuning_dir/evaluate_model.py --model outputs/models/<run>/model --eval-file data/test_data.jsonl
    python finetuning_dir/evaluate_model.py --model outputs/models/<run>/model \\
        --baseline microsoft/Phi-3.5-mini-instruct --eval-file data/test_data.jsonl

The loss is computed exactly as fine_tune.py computes eval_loss (the same trainer, built by
fine_tune.build_trainer, and the same evaluation, evaluation.py): pass the --max-length and --batch-size the model was trained with to
reproduce a run's figure. An int4 model has no torch weights to run the trainer with; its loss is
taken over the very batches that trainer builds, averaged as the trainer averages (batch_loss).
"""

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import fine_tune as ft
from chat_data import ChatDataError
from evaluation import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_QUESTIONS,
    Evaluation,
    answers_table,
    answers_text,
    conversation_ids,
    conversation_losses,
    eval_loss_of,
    evaluate,
    loss_comparison,
    read_questions,
    summary_line,
)

logger = logging.getLogger("fine_tune")



def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True,
                        help="model to evaluate: a folder fine_tune.py wrote (--model_output_dir), a Hugging Face "
                             "model folder, or a Hub id")
    parser.add_argument("--baseline",
                        help="a second model (same kinds as --model) to compare against, e.g. the base model the "
                             "first was fine-tuned from; the summary line reads 'test loss BASELINE → MODEL'")
    parser.add_argument("--eval-file", default="data/test_data.jsonl",
                        help="ultrachat-shaped chat JSONL to evaluate on (default: %(default)s)")
    parser.add_argument("--questions", type=int, default=DEFAULT_QUESTIONS,
                        help="how many of the eval file's questions to answer (default: %(default)s; 0: none)")
    parser.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                        help="longest answer, in tokens (default: %(default)s)")
    parser.add_argument("--max-length", type=int, default=2048,
                        help="sequence length of the packed eval rows, as in training (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4, help="eval batch size, as in training (default: %(default)s)")
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16-mixed", "fp32", "bf16"],
                        help="as fine_tune.py's --precision (default: auto: bf16 where the device computes it "
                             "natively, else fp32)")
    parser.add_argument("--assistant-only-loss", action="store_true",
                        help="the loss on the assistant's words only, as fine_tune.py --assistant-only-loss trains it")
    parser.add_argument("--limit", type=int,
                        help="evaluate only the first LIMIT conversations of the eval file (default: all)")
    parser.add_argument("--caption", default=None,
                        help="a line printed above the comparison of the two models' test loss (what it shows)")
    return parser.parse_args(argv)


def int4_onnx_dir(name: str) -> Path | None:
    """The ONNX folder of an int4 model folder (quantize_model.py's), or None for any other model."""
    onnx = Path(name) / "artifacts" / "onnx"
    return onnx if (Path(name) / "MLmodel").is_file() and (onnx / "genai_config.json").is_file() else None


def int4_stand_in(onnx_dir: Path, args):
    """The int4 model's tokenizer, and a one-layer torch model for SFTTrainer to hold: the trainer
    needs one to build the packed eval batches; nothing is run through it."""
    from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(onnx_dir)
    ft.configure_tokenizer(tokenizer, args.max_length)
    config = Phi3Config(vocab_size=len(tokenizer), hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=1, num_key_value_heads=1, pad_token_id=tokenizer.pad_token_id,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return Phi3ForCausalLM(config), tokenizer


def evaluate_one(name: str, options, questions) -> Evaluation:
    """Load `name`, build fine_tune.py's trainer around it, and evaluate it (options.precision resolved)."""
    print(f"Evaluating {name} on {options.eval_file} ...", flush=True)
    onnx_dir = int4_onnx_dir(name)
    with tempfile.TemporaryDirectory(prefix="evaluate-model-") as scratch:  # the trainer wants a folder; nothing is saved
        args = ft.FineTuneArguments(
            eval_file=options.eval_file, model_name=name, max_length=options.max_length,
            batch_size=options.batch_size, precision=options.precision, save_steps=0, checkpoint_dir=scratch,
            assistant_only_loss=options.assistant_only_loss,
        )
        if onnx_dir is None:
            model, tokenizer = ft.load_model(args, for_training=False)
        else:
            model, tokenizer = int4_stand_in(onnx_dir, args)
        eval_dataset = ft.prepare_dataset(options.eval_file, tokenizer, conversational=options.assistant_only_loss)
        if options.limit:
            eval_dataset = eval_dataset.select(range(min(options.limit, len(eval_dataset))))
        conversations = conversation_ids(eval_dataset["text"], tokenizer, options.max_length)
        # SFTTrainer insists on a train dataset; nothing is trained here.
        trainer = ft.build_trainer(args, model, tokenizer, eval_dataset, eval_dataset)
        if onnx_dir is None:
            return evaluate(trainer, questions, options.max_new_tokens, conversations=conversations)
        return evaluate_int4(name, trainer, questions, options.max_new_tokens, conversations)


def evaluate_int4(name: str, trainer, questions, max_new_tokens: int, conversations) -> Evaluation:
    """The int4 model's loss over the trainer's eval batches and of each conversation, and its greedy answers."""
    import mlflow

    chat = mlflow.pyfunc.load_model(name).unwrap_python_model()
    loss = eval_loss_of(chat.logits, trainer)
    answers = chat.predict(None, [q.text for q in questions], {"max_new_tokens": max_new_tokens, "do_sample": False})
    return Evaluation(loss=loss, answers=[a.strip() for a in answers], losses=conversation_losses(chat.logits, conversations))


def main(argv=None):
    options = parse_args(argv)
    options.precision = ft.resolve_precision(options.precision)  # once, for the model and the baseline
    logging.basicConfig(format="%(message)s", level=logging.WARNING, stream=sys.stdout)
    logger.setLevel(logging.INFO)
    try:
        ft.check_eval_file(options.eval_file)
        questions = read_questions(options.eval_file, options.questions)
        model = evaluate_one(options.model, options, questions)
        baseline = evaluate_one(options.baseline, options, questions) if options.baseline else None
    except ChatDataError as e:
        sys.exit(f"evaluate_model.py: {e}")
    except ft.ModelNotLoaded as e:
        sys.exit(f"evaluate_model.py: {e}; check your connection, or pass --model with a local model folder")
    if baseline is None:
        if questions:
            table = {"question": [q.text for q in questions], "reference": [q.reference for q in questions],
                     "answer": model.answers}
            print(answers_text(table))
        print(f"test loss {model.loss:.3f} (perplexity {model.perplexity:.4g})")
        return model
    if questions:
        print(answers_text(answers_table(questions, baseline, model, names=("baseline", "model"))))
    print(("\n" + options.caption if options.caption else "") + "\nThe test loss, conversation by conversation:\n"
          + loss_comparison(baseline, model, names=("model", "baseline"))[0] + "\n")
    print(f"relative change of the test loss: {100 * (model.loss - baseline.loss) / baseline.loss:+.2f}%")
    print(summary_line(baseline, model))
    return baseline, model


if __name__ == "__main__":
    main()
