"""The rehearsal: the real job and the real deployment, for cents, before the A100 hour.

`setup_ml.py --rehearsal` submits the very job of step 2 (environment, code, both outputs, int4
conversion, MLflow logging) with a tiny Phi-3 built here and a few dozen rows of the data, on a
small CPU cluster that scales to 0. `deploy_model.py --rehearsal` deploys its int4 model to an
endpoint of its own on the smallest size, asks it one question through the Prompt flow, and
deletes that endpoint once answered (docs/azure-runtime.md, "The rehearsal").
"""

import itertools
from pathlib import Path

import config

CLUSTER_NAME = "cpu-rehearsal"
CLUSTER_SIZE = "Standard_DS3_v2"  # the smallest that holds the GPU job's environment
MAX_HOURS = 1
ROWS = (40, 10)  # train, test
FOLDER = config.ROOT / "outputs" / "rehearsal"
JOB_SETTING = "AZURE_ML_REHEARSAL_JOB_NAME"
DEPLOYMENT_SIZE = "Standard_DS1_v2"  # the smallest size managed online endpoints offer
DEPLOYMENT_NAME = "rehearsal"
QUESTION = "Who founded Microsoft?"


def write_inputs(folder: Path) -> tuple[Path, Path, Path]:
    """A tiny Phi-3 and the first few dozen rows of the data, in `folder`: (model, train, test)."""
    from stand_ins.tiny_phi3 import build

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for source, rows, name in zip((config.TRAIN_DATA_PATH, config.TEST_DATA_PATH), ROWS, ("train", "test")):
        with open(source, encoding="utf-8") as f:
            head = [line for line in itertools.islice(f, rows * 2) if line.strip()][:rows]
        files.append(folder / f"{name}_data.jsonl")
        files[-1].write_text("".join(head), encoding="utf-8")
    model = folder / "tiny-phi3"
    if not (model / "config.json").is_file():
        build(model)
    return model, *files


def job_inputs(extra_args) -> tuple[dict, dict]:
    """The job's inputs (the tiny model, as a folder) and its other settings: the rows, the training flags."""
    from azure.ai.ml import Input

    from stand_ins.tiny_phi3 import TINY_TRAINING_FLAGS

    model, train, test = write_inputs(FOLDER)
    print(f"Rehearsing with a tiny Phi-3 and {sum(ROWS)} rows of {config.TRAIN_DATA_PATH} and {config.TEST_DATA_PATH}")
    return {"model_name": Input(type="uri_folder", path=str(model))}, dict(
        data=(train, test), extra_args=[*TINY_TRAINING_FLAGS, *extra_args], display_name="fine-tune-phi-3-rehearsal")


def endpoint_name(real_endpoint_name: str) -> str:
    """The rehearsal's own endpoint, beside the real one: within 32 characters, no double hyphen."""
    return real_endpoint_name[:22].rstrip("-") + "-rehearsal"


def ask(ml_client, endpoint: str) -> str:
    """One question through the Prompt flow to the rehearsal endpoint, .env untouched."""
    from chat.ask_flow import ask_the_flow

    settings = {
        "AZURE_ML_ENDPOINT": ml_client.online_endpoints.get(name=endpoint).scoring_uri,
        "AZURE_ML_API_KEY": ml_client.online_endpoints.get_keys(name=endpoint).primary_key,
    }
    answer = ask_the_flow(QUESTION, settings)
    print(f"\nQ: {QUESTION}\nA (the rehearsal's tiny model, through the flow): {answer}")
    return answer
