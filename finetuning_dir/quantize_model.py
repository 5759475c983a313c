"""Convert a model folder fine_tune.py wrote into its int4 ONNX serving form, for CPU endpoints.

A 3.8B-parameter model in bf16 answers at a few tokens a second on the tutorial's CPU deployment
(Standard_E4s_v3): decoding reads every weight for every token. This writes the same model with
4-bit weights (onnxruntime-genai's model builder: int4 blocks of 32 weights, int8 activations in
the matmuls, onnxruntime's CPU kernels) as an MLflow pyfunc model folder with the contract of the
transformers one: the same signature and params (max_new_tokens, temperature, do_sample,
return_full_text), the same chat template, a list of strings back. deploy_model.py serves either.

    python finetuning_dir/quantize_model.py --model-dir outputs/models/<run>/model \\
        --output-dir outputs/models/<run>/model-int4

The model is built in a temporary folder on this machine's disk and copied into the output folder,
its MLmodel file last (model_folder.py: the output may be an Azure ML job's mount point).
fine_tune.py --quantized_output_dir runs the same conversion at the end of training (the Azure
job declares that folder as a second model output).
"""

import argparse
import logging
import sys
from importlib.metadata import version
from pathlib import Path

import mlflow
from mlflow.models import Model

import model_folder

INT4_MODEL_CODE = Path(__file__).resolve().with_name("int4_model.py")
FORM = "int4"
BLOCK_SIZE = 32  # the builder's default: finer blocks keep more precision than 64 or 128, at the same speed
CHAT_METADATA = ("chat_template", "bos_token", "eos_token")  # fine_tune.py's chat_metadata()
ACCURACY_LEVEL = 4  # int8 activations: 5x faster per token than fp32 ones on an AVX2 CPU (BENCHMARKS.md)


class QuantizeError(ValueError):
    """The input or output folder is not usable; the message says which and how to fix it."""


def check_model_dir(model_dir: Path) -> Model:
    """The MLflow model fine_tune.py wrote at `model_dir`, or QuantizeError."""
    if not (model_dir / "MLmodel").is_file():
        raise QuantizeError(
            f"{model_dir} is not an MLflow model folder (no MLmodel file); pass the folder fine_tune.py wrote "
            "as --model_output_dir, e.g. outputs/models/<run>/model"
        )
    source = Model.load(str(model_dir))
    flavor = source.flavors.get("transformers", {})
    if flavor.get("task") != "text-generation" or not (model_dir / "model" / "config.json").is_file():
        raise QuantizeError(
            f"{model_dir} is an MLflow model but not a transformers text-generation model with its weights "
            "(model/config.json); pass the folder fine_tune.py wrote as --model_output_dir"
        )
    return source


def stage_hf_folder(model_dir: Path, staging: Path) -> Path:
    """One folder with the weights and the tokenizer, as the builder reads a Hugging Face model."""
    staging.mkdir()
    for part in (model_dir / "model", model_dir / "components" / "tokenizer"):
        for path in part.iterdir():
            (staging / path.name).symlink_to(path.resolve())
    return staging


def build_onnx(hf_folder: Path, onnx_dir: Path, cache_dir: Path) -> Path:
    """int4 ONNX for onnxruntime's CPU provider, with onnxruntime-genai's model builder."""
    from onnxruntime_genai.models.builder import create_model, parse_extra_options

    options = [f"block_size={BLOCK_SIZE}", f"accuracy_level={ACCURACY_LEVEL}"]
    extra = parse_extra_options(None, str(hf_folder), str(onnx_dir), FORM, "cpu", str(cache_dir), options)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per matmul otherwise
    create_model(None, str(hf_folder), str(onnx_dir), FORM, "cpu", str(cache_dir), **extra)
    return onnx_dir


def serving_requirements() -> list[str]:
    """What the int4 model needs to serve, pinned as installed here: no torch, no CUDA wheels."""
    return [f"{name}=={version(name)}" for name in ("mlflow", "onnxruntime-genai", "onnxruntime", "numpy", "pandas")]


def save_int4_model(onnx_dir: Path, path: Path, source: Model) -> None:
    """Write the int4 MLflow pyfunc folder around `onnx_dir`, with `source`'s signature and chat template."""
    prompt_template = source.metadata["prompt_template"]
    chat = {key: source.metadata[key] for key in CHAT_METADATA if key in source.metadata}  # for the endpoint
    mlflow.pyfunc.save_model(
        path=str(path),
        python_model=str(INT4_MODEL_CODE),  # the model's code is that file, copied into the folder
        artifacts={"onnx": str(onnx_dir)},
        signature=source.signature,
        model_config={
            "prompt_template": prompt_template,
            "predict_params": {param.name: param.default for param in source.signature.params.params},
        },
        metadata={
            "prompt_template": prompt_template,
            **chat,
            "quantization": f"int4 weights in blocks of {BLOCK_SIZE}, int8 activations (accuracy level "
                            f"{ACCURACY_LEVEL}), onnxruntime-genai {version('onnxruntime-genai')} model builder",
        },
        pip_requirements=serving_requirements(),
    )


def quantize(model_dir, output_dir) -> Path:
    """Convert fine_tune.py's model at `model_dir` into the int4 MLflow model `output_dir`; return it."""
    model_dir, output_dir = Path(model_dir), Path(output_dir)
    source = check_model_dir(model_dir)
    with model_folder.staged(output_dir, "--output-dir") as staged:
        work = staged.parent
        print(f"Converting {model_dir} to int4 ONNX (onnxruntime-genai model builder) ...", flush=True)
        onnx_dir = build_onnx(stage_hf_folder(model_dir, work / "hf"), work / "onnx", work / "cache")
        save_int4_model(onnx_dir, staged, source)
    size = sum(f.stat().st_size for f in output_dir.rglob("*") if f.is_file())
    print(f"Saved the int4 MLflow model to {output_dir} ({size / 2**20:,.1f} MiB)", flush=True)
    return output_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, required=True,
                        help="the MLflow model folder fine_tune.py wrote (its --model_output_dir)")
    parser.add_argument("--output-dir", type=Path, required=True,
                        help="folder to write the int4 MLflow model to; must be new or empty")
    args = parser.parse_args(argv)
    try:
        return quantize(args.model_dir, args.output_dir)
    except (QuantizeError, model_folder.OutputFolderError) as e:
        sys.exit(f"quantize_model.py: {e}")


if __name__ == "__main__":
    main()
