"""Step 2: fine-tune Phi-3 as an Azure ML command job (or, with --local, on this machine).

Before anything is created or billed, a pre-flight checks the cluster's region (the workspace's,
unless --location says otherwise), its VM size's family, vCPUs and GPUs, and the vCPU quota of that
family in that region; short quota stops the script with one line saying where to request more.

Then this creates the tutorial's resources and submits its job:
  - Environment `phi-3-training-environment`: Azure ML's CUDA 12.8 base image (pinned) + conda.yml;
  - AmlCompute `gpu-nc24s-a100-v4` (Standard_NC24ads_A100_v4, the workspace's region, Dedicated,
    0..1 nodes), reused when it exists (warned about when it keeps nodes while idle);
  - a command job running finetuning_dir/fine_tune.py on TRAIN_DATA_PATH / TEST_DATA_PATH,
    whose `model_output` output (an MLflow model) and `quantized_model_output` (its int4 ONNX form
    for CPU endpoints) deploy_model.py registers. It runs one process per GPU of each node, writes no
    trainer checkpoints (they would land on the node's disk, gone when the job ends), and has a time
    limit (--max-hours) after which Azure cancels it. On a GPU size (or one that cannot be classified)
    it passes --require_gpu: a torch that cannot use the GPU stops the job in seconds.
The job name and its studio URL are printed, and the name is recorded in .env as
AZURE_ML_JOB_NAME so that deploy_model.py finds it. Logs are streamed until the job ends.

`--base-model registry` takes Phi-3.5-mini-instruct from Azure ML's own registry, mounted
read-only, instead of the job downloading it from the Hugging Face Hub.

`--local` runs the very same fine_tune.py command here instead, into outputs/models/<run>/model,
with a tiny Phi-3 model built on the spot unless --model-name names another.

`--rehearsal` submits the very same job (environment, code, both outputs, int4 conversion, MLflow
logging) for cents before the A100 hour: a tiny Phi-3 built here and uploaded as an input folder,
the first few dozen rows of the data, on a small CPU cluster that scales to 0. Its job name goes
to .env as AZURE_ML_REHEARSAL_JOB_NAME for `deploy_model.py --rehearsal`.

    python setup_ml.py                   # A100 job, logs streamed
    python setup_ml.py --cpu             # the tutorial's CPU profile (Standard_E16s_v3)
    python setup_ml.py -- --lora         # flags after -- go to fine_tune.py
    python setup_ml.py --local
    python setup_ml.py --rehearsal
"""

import argparse
import itertools
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from azure.ai.ml import Input, Output, PyTorchDistribution, command
from azure.ai.ml.entities import AmlCompute, Environment
from azure.ai.ml.exceptions import JobException
from azure.core.exceptions import ResourceNotFoundError

import config
from config import ROOT
from ml_client import OPENMPI_IMAGE, get_ml_client
from preflight import (
    SizeFacts, check_quota, choose_location, cluster_vcpus, has_gpu, same_region, size_facts, workspace_location,
)
from prices import cost_for, cost_per_hour

CONDA_FILE = ROOT / "conda.yml"
FINETUNING_DIR = ROOT / "finetuning_dir"  # Path to the fine-tuning script
TRAINING_ENV_NAME = "phi-3-training-environment"  # Name of the training environment
EXPERIMENT_NAME = "finetune-phi"
LOCAL_OUTPUTS = ROOT / "outputs"


@dataclass(frozen=True)
class ComputeProfile:
    instance_type: str
    compute_name: str
    docker_image: str
    max_hours: float  # the job's time limit (docs/azure-runtime.md says how each was chosen)


# Images at fixed tags: conda.yml builds its own Python environment on top, so an image only brings the
# OS, conda and, for a GPU, CUDA's user libraries and the NVIDIA container settings. The GPU job takes
# Azure ML's supported base image whose CUDA (12.8.1) is torch 2.10's own, so no older cuBLAS from the
# image can shadow the wheel's (docs/azure-runtime.md, "Images"); the CPU profile takes ml_client.OPENMPI_IMAGE.
GPU_IMAGE = "mcr.microsoft.com/azureml/openmpi5.0-cuda12.8-ubuntu24.04:20260715.v1"
CPU_IMAGE = OPENMPI_IMAGE
# Azure ML's own copy of the base model (an MLflow model in its hftransformersv2 layout, data/model and
# data/tokenizer), which a job mounts read-only instead of downloading 7.6 GB from the Hugging Face Hub.
# Version 6 is the newest azureml-assets publishes; Azure archived it on 2026-06-02 (archived models stay
# usable by their full id), so the Hub stays the default (docs/azure-runtime.md, "The base model").
REGISTRY_BASE_MODEL = "azureml://registries/azureml/models/Phi-3.5-mini-instruct/versions/6"
GPU_PROFILE = ComputeProfile("Standard_NC24ads_A100_v4", "gpu-nc24s-a100-v4", GPU_IMAGE, max_hours=4)
CPU_PROFILE = ComputeProfile("Standard_E16s_v3", "cpu-e16s-v3", CPU_IMAGE, max_hours=6)
# The rehearsal runs the GPU job's own environment on the smallest cluster that holds it.
REHEARSAL_PROFILE = ComputeProfile("Standard_DS3_v2", "cpu-rehearsal", GPU_IMAGE, max_hours=1)
REHEARSAL_ROWS = (40, 10)  # train, test
REHEARSAL_DIR = ROOT / "outputs" / "rehearsal"

logger = logging.getLogger("setup_ml")


# A checkpoint of a full fine-tune is the fp32 weights and AdamW's two moments (~46 GB for
# Phi-3.5-mini). In a job it would sit on the node's local disk, which is discarded when the job
# ends, so nothing could ever resume from it: the job turns checkpoints off (`-- --save-steps 500`
# turns them back on, into fine_tune.py's `checkpoints/`, which is not uploaded as ./outputs is).
JOB_FLAGS = ("--save-steps", "0")
GPU_JOB_FLAGS = ("--require_gpu",)


def fine_tune_command(train_file: str, eval_file: str, model_output_dir: str, quantized_output_dir: str | None,
                      extra_args=()) -> list[str]:
    """The fine_tune.py command line, the same for the Azure job and the local run."""
    return [
        "python", "fine_tune.py",
        "--train-file", train_file,
        "--eval-file", eval_file,
        "--model_output_dir", model_output_dir,
        *(["--quantized_output_dir", quantized_output_dir] if quantized_output_dir else []),
        *extra_args,
    ]  # fmt: skip


def create_or_get_environment(ml_client, docker_image):
    """
    Create or update the training environment in Azure ML.
    """
    env = Environment(
        image=docker_image,  # Docker image for the environment
        conda_file=str(CONDA_FILE),  # Conda environment file
        name=TRAINING_ENV_NAME,  # Name of the environment
    )
    return ml_client.environments.create_or_update(env)


def find_cluster(ml_client, compute_name):
    """The workspace's cluster of that name, or None."""
    try:
        return ml_client.compute.get(compute_name)
    except ResourceNotFoundError:
        return None


@dataclass(frozen=True)
class ClusterPlan:
    """The cluster a job will run on, as the pre-flight found it, before anything is created."""

    name: str
    size: SizeFacts
    location: str
    nodes: int
    existing: AmlCompute | None
    gpu: bool  # whether the job must stop when torch sees no GPU


def plan_cluster(ml_client, compute_name, instance_type, requested_location, nodes) -> ClusterPlan:
    """Pre-flight: the cluster's region, size, GPUs and quota; stops with one line when quota is short."""
    existing = find_cluster(ml_client, compute_name)
    if existing is not None:
        location = existing.location or workspace_location(ml_client, config.AZURE_ML_WORKSPACE_NAME)
        if requested_location and not same_region(requested_location, location):
            print(f"setup_ml.py: warning: cluster '{compute_name}' exists in {location}; --location "
                  f"{requested_location} applies to a new cluster only")
        instance_type = existing.size
    else:
        location = choose_location(ml_client, config.AZURE_ML_WORKSPACE_NAME, requested_location, "setup_ml.py")
    facts = size_facts(ml_client, instance_type, location)
    held = (existing.max_instances or 0) if existing is not None else 0  # a cluster holds its quota at 0 nodes
    check_quota(ml_client, location, facts, cluster_vcpus(max(0, nodes - held), facts),
                f"cluster '{compute_name}' ({nodes} x {facts.name})", "setup_ml.py")
    gpu, why = has_gpu(facts)
    if gpu and not facts.gpus:
        print(f"setup_ml.py: {why}; the job passes --require_gpu")
    if existing is not None and (existing.min_instances or 0) > 0:
        print(f"setup_ml.py: warning: cluster '{compute_name}' keeps {existing.min_instances} node(s) running "
              f"while idle (min_instances={existing.min_instances}), which bills "
              f"{cost_per_hour(existing.size, existing.min_instances)} whether a job runs or not; set its "
              "minimum nodes to 0 in the studio (Compute > Compute clusters > Edit)")
    return ClusterPlan(compute_name, facts, location, nodes, existing, gpu)


def create_or_get_compute_cluster(ml_client, plan: ClusterPlan):
    """
    Create the compute cluster in Azure ML, or reuse it (growing max_instances if a job needs more).
    """
    compute_cluster = plan.existing
    if compute_cluster is None:
        print(f"Creating compute cluster '{plan.name}' ({plan.size.name}, {plan.location}); this takes a few "
              "minutes...")
        compute_cluster = AmlCompute(
            name=plan.name,
            size=plan.size.name,
            location=plan.location,
            tier="Dedicated",  # Tier of the compute cluster
            min_instances=0,  # scales to zero: no cost while idle
            max_instances=plan.nodes,
        )
        return ml_client.compute.begin_create_or_update(compute_cluster).result()
    print(f"Compute cluster '{plan.name}' already exists. Reusing it for the current run.")
    if (compute_cluster.max_instances or 0) < plan.nodes:
        print(f"Raising its max_instances from {compute_cluster.max_instances} to {plan.nodes}...")
        compute_cluster.max_instances = plan.nodes
        compute_cluster = ml_client.compute.begin_create_or_update(compute_cluster).result()
    return compute_cluster


def create_fine_tuning_job(env, compute_name, instance_count=1, extra_args=(), processes_per_node=1, int4=True,
                           require_gpu=False, data=None, inputs=None, display_name="fine-tune-phi-3",
                           max_hours=None):
    """
    Set up the fine-tuning job in Azure ML. `data`: (train, test) files (default: config's); `inputs`:
    more job inputs, each passed to fine_tune.py as `--NAME ${{inputs.NAME}}` (model_name: --model-name);
    `max_hours`: the time limit after which Azure cancels the job.
    """
    train_file, eval_file = data or (config.TRAIN_DATA_PATH, config.TEST_DATA_PATH)
    inputs = inputs or {}
    input_flags = [(f"--{name.replace('_', '-')}", f"${{{{inputs.{name}}}}}") for name in inputs]
    # Only the user's extra flags are shell-quoted: quoting would break the ${{...}} placeholders.
    job_command = " ".join(
        fine_tune_command("${{inputs.train_file}}", "${{inputs.eval_file}}", "${{outputs.model_output}}",
                          "${{outputs.quantized_model_output}}" if int4 else None,
                          JOB_FLAGS + (GPU_JOB_FLAGS if require_gpu else ()))
        + list(itertools.chain.from_iterable(input_flags))
        + [shlex.quote(arg) for arg in extra_args]
    )
    # Declared as MLflow models so registration does not depend on where MLflow puts artifacts.
    outputs = {"model_output": Output(type="mlflow_model")}
    if int4:  # the int4 ONNX form for CPU endpoints, written beside the transformers model
        outputs["quantized_model_output"] = Output(type="mlflow_model")
    distributed = instance_count * processes_per_node > 1
    return command(
        code=str(FINETUNING_DIR),  # Folder of fine_tune.py
        command=job_command,
        environment=f"azureml:{env.name}:{env.version}",  # the registered training environment
        compute=compute_name,  # Compute cluster to use
        experiment_name=EXPERIMENT_NAME,
        display_name=display_name,
        inputs={
            "train_file": Input(type="uri_file", path=str(train_file)),
            "eval_file": Input(type="uri_file", path=str(eval_file)),
            **inputs,
        },
        outputs=outputs,
        instance_count=instance_count,
        # One process per GPU; each gets RANK/LOCAL_RANK/WORLD_SIZE, which the trainer uses.
        distribution=PyTorchDistribution(process_count_per_instance=processes_per_node) if distributed else None,
        timeout=round(max_hours * 3600) if max_hours else None,
    )


def check_data_files():
    for path in (config.TRAIN_DATA_PATH, config.TEST_DATA_PATH):
        if not os.path.isfile(path):
            sys.exit(f"setup_ml.py: {path} not found; run `python download_dataset.py` first")


def submit_and_stream(ml_client, job, stream=True, setting="AZURE_ML_JOB_NAME"):
    """Submit the job, record its name in .env under `setting`, and stream its logs until it ends."""
    returned_job = ml_client.jobs.create_or_update(job)  # Submit the job
    config.save_settings(**{setting: returned_job.name})
    print(f"Job name: {returned_job.name} (recorded in .env as {setting} for deploy_model.py)")
    print(f"Studio URL: {returned_job.studio_url}")
    if not stream:
        print("Not streaming (--no-stream); follow the job in the studio.")
        return returned_job
    try:
        ml_client.jobs.stream(returned_job.name)  # Stream the job logs
    except JobException as e:
        first_line = next((line.strip() for line in str(e).splitlines() if line.strip() not in ("", "Exception :")), "")
        sys.exit(f"setup_ml.py: job {returned_job.name} failed: {first_line}; see its logs at {returned_job.studio_url}")
    return returned_job


def print_time_limit(plan: ClusterPlan, max_hours: float) -> None:
    print(f"Time limit: {max_hours:g} h, after which Azure cancels the job; the most a job that hangs can cost: "
          f"{cost_for(plan.size.name, max_hours, plan.nodes)}")


def run_on_azure(args, extra_args):
    profile = CPU_PROFILE if args.cpu else GPU_PROFILE
    compute_name = args.compute_name or profile.compute_name
    check_data_files()
    ml_client = get_ml_client()
    # Everything is checked before anything is created or billed.
    plan = plan_cluster(ml_client, compute_name, args.compute_size or profile.instance_type, args.location,
                        args.instance_count)
    max_hours = args.max_hours or profile.max_hours

    env = create_or_get_environment(ml_client, profile.docker_image)
    cluster = create_or_get_compute_cluster(ml_client, plan)
    processes = max(1, plan.size.gpus or 1)
    print(f"Training on {args.instance_count} node(s) of {cluster.size}, {processes} process(es) per node (one per GPU)")
    print_time_limit(plan, max_hours)
    inputs = {}
    if args.base_model == "registry":
        print(f"Base model: {REGISTRY_BASE_MODEL}, mounted read-only")
        inputs["model_name"] = Input(type="mlflow_model", path=REGISTRY_BASE_MODEL, mode="ro_mount")
    job = create_fine_tuning_job(env, compute_name, args.instance_count, extra_args, processes,
                                 int4=not args.no_int4, require_gpu=plan.gpu, max_hours=max_hours, inputs=inputs)
    return submit_and_stream(ml_client, job, stream=not args.no_stream)


def write_rehearsal_inputs(folder: Path) -> tuple[Path, Path, Path]:
    """A tiny Phi-3 and the first few dozen rows of the data, in `folder`: (model, train, test)."""
    from stand_ins.tiny_phi3 import build

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for source, rows, name in zip((config.TRAIN_DATA_PATH, config.TEST_DATA_PATH), REHEARSAL_ROWS, ("train", "test")):
        with open(source, encoding="utf-8") as f:
            head = [line for line in itertools.islice(f, rows * 2) if line.strip()][:rows]
        files.append(folder / f"{name}_data.jsonl")
        files[-1].write_text("".join(head), encoding="utf-8")
    model = folder / "tiny-phi3"
    if not (model / "config.json").is_file():
        build(model)
    return model, *files


def rehearse_on_azure(args, extra_args):
    """The real job, for cents: its environment, code and outputs, with a tiny model on a small CPU cluster."""
    from stand_ins.tiny_phi3 import TINY_TRAINING_FLAGS

    check_data_files()
    profile = replace(REHEARSAL_PROFILE, compute_name=args.compute_name or REHEARSAL_PROFILE.compute_name,
                      instance_type=args.compute_size or REHEARSAL_PROFILE.instance_type)
    ml_client = get_ml_client()
    plan = plan_cluster(ml_client, profile.compute_name, profile.instance_type, args.location, 1)
    max_hours = args.max_hours or profile.max_hours
    model, train, test = write_rehearsal_inputs(REHEARSAL_DIR)
    env = create_or_get_environment(ml_client, profile.docker_image)
    cluster = create_or_get_compute_cluster(ml_client, plan)
    print(f"Rehearsing on {cluster.size} with a tiny Phi-3 and {sum(REHEARSAL_ROWS)} rows of {config.TRAIN_DATA_PATH} "
          f"and {config.TEST_DATA_PATH}")
    print_time_limit(plan, max_hours)
    job = create_fine_tuning_job(
        env, profile.compute_name, extra_args=[*TINY_TRAINING_FLAGS, *extra_args],
        require_gpu=plan.gpu, display_name="fine-tune-phi-3-rehearsal", max_hours=max_hours,
        data=(train, test), inputs={"model_name": Input(type="uri_folder", path=str(model))},
    )
    job = submit_and_stream(ml_client, job, stream=not args.no_stream, setting="AZURE_ML_REHEARSAL_JOB_NAME")
    print("Next: `python deploy_model.py --rehearsal` deploys its int4 model on the smallest endpoint size and "
          "asks it one question through the flow.")
    return job


def run_locally(args, extra_args) -> Path:
    """Run the job's fine_tune.py command on this machine; return the model folder."""
    check_data_files()
    if not args.model_name:
        from stand_ins.tiny_phi3 import TINY_MODEL_DIR, TINY_TRAINING_FLAGS, build

        if not (TINY_MODEL_DIR / "config.json").exists():
            print(f"Building a tiny Phi-3 model in {TINY_MODEL_DIR} (pass --model-name for a real one)")
            build(TINY_MODEL_DIR)
        extra_args = ["--model-name", str(TINY_MODEL_DIR), *TINY_TRAINING_FLAGS, *extra_args]
    run_dir = LOCAL_OUTPUTS / "models" / time.strftime("%Y%m%d-%H%M%S")
    cmd = fine_tune_command(
        os.path.abspath(config.TRAIN_DATA_PATH),
        os.path.abspath(config.TEST_DATA_PATH),
        str(run_dir / "model"),
        None if args.no_int4 else str(run_dir / "model-int4"),
        [*extra_args, "--checkpoint_dir", str(run_dir / "checkpoints")],
    )
    cmd[0] = sys.executable
    from local import mlflow_store

    env = {**os.environ, **mlflow_store.unless_set(LOCAL_OUTPUTS)}
    print(f"Running locally in {FINETUNING_DIR.name}/: {shlex.join(cmd)}", flush=True)
    if subprocess.run(cmd, cwd=FINETUNING_DIR, env=env).returncode != 0:
        sys.exit("setup_ml.py: local fine-tuning failed (see the messages above)")
    print(f"Fine-tuned MLflow model: {run_dir / 'model'}" + ("" if args.no_int4 else f", int4: {run_dir / 'model-int4'}"))
    return run_dir / "model"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu", action="store_true", help="use the tutorial's CPU profile: Standard_E16s_v3 "
                        f"cluster 'cpu-e16s-v3' with the {CPU_IMAGE.split('/')[-1]} image")
    parser.add_argument("--compute-name", help="compute cluster name (default: gpu-nc24s-a100-v4, or cpu-e16s-v3 with --cpu)")
    parser.add_argument("--compute-size", help="VM size of a new cluster (default: Standard_NC24ads_A100_v4, or "
                        "Standard_E16s_v3 with --cpu); a size with several GPUs, e.g. Standard_NC96ads_A100_v4, "
                        "runs one training process per GPU")
    parser.add_argument("--location", default=None, help="region of a new compute cluster (default: the workspace's "
                        "region; another region gets a warning, and the quota checked is that region's)")
    parser.add_argument("--max-hours", type=float, default=None,
                        help="time limit of the job, after which Azure cancels it and its nodes stop billing "
                             f"(default: {GPU_PROFILE.max_hours:g} on the A100, {CPU_PROFILE.max_hours:g} with --cpu, "
                             f"{REHEARSAL_PROFILE.max_hours:g} with --rehearsal)")
    parser.add_argument("--instance-count", type=int, default=1,
                        help="nodes to train on with PyTorch distribution; the cluster's max_instances follows (default: 1)")
    parser.add_argument("--no-stream", action="store_true", help="submit the job and return without streaming its logs")
    parser.add_argument("--no-int4", action="store_true",
                        help="skip the int4 ONNX serving form the job writes beside the model (output "
                             "quantized_model_output; with --local, outputs/models/<run>/model-int4)")
    parser.add_argument("--model-name", help="model to fine-tune, passed to fine_tune.py (default: "
                        "microsoft/Phi-3.5-mini-instruct on Azure; a tiny Phi-3 built on the spot with --local)")
    parser.add_argument("--base-model", choices=("hub", "registry"), default="hub",
                        help="where the job takes microsoft/Phi-3.5-mini-instruct from: hub (the Hugging Face Hub, "
                             "downloaded by the job, as the tutorial does) or registry (Azure ML's own copy, "
                             f"{REGISTRY_BASE_MODEL}, mounted read-only from Azure's storage: no 7.6 GB download "
                             "from the internet on every try) (default: hub)")
    parser.add_argument("--rehearsal", action="store_true",
                        help="submit the same job for cents first: the same environment, code, outputs, int4 "
                             "conversion and MLflow logging, with a tiny Phi-3 built here (an input folder) and "
                             f"{REHEARSAL_ROWS[0]}+{REHEARSAL_ROWS[1]} rows of the data, on a "
                             f"{REHEARSAL_PROFILE.instance_type} cluster '{REHEARSAL_PROFILE.compute_name}' "
                             "that scales to 0; records AZURE_ML_REHEARSAL_JOB_NAME in .env")
    parser.add_argument("--local", action="store_true", help="run the same fine_tune.py command on this machine "
                        "instead, into outputs/models/<run>/model (no Azure account needed); without --model-name "
                        "it builds a tiny Phi-3 and trains it at a high learning rate for many epochs "
                        "(stand_ins/tiny_phi3.py's TINY_TRAINING_FLAGS), so that it learns the sample facts "
                        "word for word")
    parser.add_argument("fine_tune_args", nargs=argparse.REMAINDER,
                        help="after --: more flags for fine_tune.py, e.g. -- --lora --epochs 1")
    args = parser.parse_args(argv)
    extra = args.fine_tune_args[1:] if args.fine_tune_args[:1] == ["--"] else args.fine_tune_args
    if args.model_name and args.base_model == "registry":
        parser.error("--model-name and --base-model registry both name the model to fine-tune; give one")
    if args.model_name:
        extra = ["--model-name", args.model_name, *extra]
    if args.instance_count < 1:
        parser.error("--instance-count must be at least 1")
    if args.max_hours is not None and args.max_hours <= 0:
        parser.error("--max-hours must be more than 0")
    return args, extra


def main(argv=None):
    """
    Main function to set up and run the fine-tuning job in Azure ML.
    """
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.WARNING)
    args, extra_args = parse_args(argv)
    if args.local:
        return run_locally(args, extra_args)
    if args.rehearsal:
        return rehearse_on_azure(args, extra_args)
    return run_on_azure(args, extra_args)


if __name__ == "__main__":
    main()
