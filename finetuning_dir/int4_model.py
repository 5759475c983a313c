"""The int4 ONNX form of a fine-tuned Phi-3 model, served as an MLflow pyfunc model.

quantize_model.py writes it: onnxruntime-genai's model builder turns the fine-tuned transformers
model into int4 ONNX (4-bit weights, int8 activations in the matmuls: onnxruntime's CPU path for
Phi-3), and this class serves it with the contract of fine_tune.py's transformers model: a list of
strings in, each wrapped in the model's chat template (the MLflow prompt template); the params
max_new_tokens, temperature, do_sample and return_full_text; a list of strings out.

Serving needs only mlflow, numpy and onnxruntime-genai (no torch, no transformers), so the model
installs on a CPU image without pulling CUDA wheels. The model folder holds this very file as its
code (MLflow's "models from code": no pickle), so it stands alone.
"""

import json
import os
from pathlib import Path

import mlflow
import numpy as np

ONNX_ARTIFACT = "onnx"


def texts_of(model_input) -> list[str]:
    """The questions, as MLflow hands them over: a DataFrame of one column, a list, or one string."""
    if hasattr(model_input, "iloc"):  # pandas DataFrame (MLflow's schema enforcement makes one)
        return [str(value) for value in model_input.iloc[:, 0].tolist()]
    if isinstance(model_input, str):
        return [model_input]
    return [str(value) for value in list(model_input)]


def cpu_threads() -> int:
    """The CPUs this process may run on: onnxruntime's own default left half of them idle here."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class Int4ChatModel(mlflow.pyfunc.PythonModel):
    """An onnxruntime-genai model answering chat questions, as fine_tune.py's MLflow model does."""

    def load_context(self, context):
        config = context.model_config
        self.load(context.artifacts[ONNX_ARTIFACT], config["prompt_template"], config["predict_params"])

    def load(self, onnx_dir: str, prompt_template: str, default_params: dict):
        """`default_params`: the params' defaults of the model it came from (its MLflow signature)."""
        import onnxruntime_genai as og

        config = og.Config(onnx_dir)
        # Set, not left to onnxruntime: its default ran 1.75x slower per token on a 2-core VM.
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": cpu_threads()}}}}))
        self.og = og
        self.model = og.Model(config)
        self.tokenizer = og.Tokenizer(self.model)
        self.prompt_template = prompt_template
        self.default_params = dict(default_params)
        eos = json.loads((Path(onnx_dir) / "genai_config.json").read_text())["model"]["eos_token_id"]
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])

    def predict(self, context, model_input, params=None):
        params = {**self.default_params, **(params or {})}
        return self.answers(texts_of(model_input), params)

    def answers(self, texts: list[str], params: dict) -> list[str]:
        """The answers to a request's questions, decoded together: each decode step reads the weights once for
        all of them (they share the request's params). onnxruntime-genai pads the shorter prompts and masks the
        padding, so each answer is the one it gets alone; a static batch runs until its longest answer ends."""
        prompts = [self.prompt_template.format(prompt=text) for text in texts]
        prompt_ids = self.tokenizer.encode_batch(prompts)
        search = {"max_length": prompt_ids.shape()[1] + int(params["max_new_tokens"]), "batch_size": len(prompts),
                  "do_sample": bool(params["do_sample"])}
        if search["do_sample"]:
            search["temperature"] = float(params["temperature"])
        generator_params = self.og.GeneratorParams(self.model)
        generator_params.set_search_options(**search)
        generator = self.og.Generator(self.model, generator_params)
        generator.append_tokens(prompt_ids)
        new_tokens, ended = [[] for _ in prompts], [False] * len(prompts)
        while not generator.is_done():
            generator.generate_next_token()
            for row, token in enumerate(generator.get_next_tokens()):
                if not ended[row]:  # an answer that has ended gets padding from here on
                    new_tokens[row].append(int(token))
                    ended[row] = int(token) in self.eos_ids
        answers = [self.tokenizer.decode(np.array(tokens, dtype=np.int32)) for tokens in new_tokens]
        return [prompt + answer if params["return_full_text"] else answer for prompt, answer in zip(prompts, answers)]

    def logits(self, token_ids) -> np.ndarray:
        """The model's logits at every position of `token_ids` ([positions, vocabulary]), for the test loss."""
        generator_params = self.og.GeneratorParams(self.model)
        generator_params.set_search_options(max_length=len(token_ids) + 1)
        generator = self.og.Generator(self.model, generator_params)
        generator.append_tokens(np.asarray(token_ids, dtype=np.int32))
        return np.asarray(generator.get_output("logits"))[0]


mlflow.models.set_model(Int4ChatModel())  # what MLflow loads when it runs this file as the model's code
