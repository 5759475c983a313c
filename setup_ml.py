"""Step 2: fine-tune Phi-3 as an Azure ML command job (or, with --local, on this machine).

As the tutorial: the environment phi-3-training-environment, the cluster gpu-nc24s-a100-v4 and the
job running finetuning_dir/fine_tune.py, its name recorded in .env as AZURE_ML_JOB_NAME for
deploy_model.py, its logs streamed until it ends. Before anything is created, a pre-flight checks
the region, the VM size and its quota; every job has a time limit (docs/azure-runtime.md).

    python setup_ml.py                   # A100 job, logs streamed
    python setup_ml.py --rehearsal       # the same job for cents first, on a small CPU cluster
    python setup_ml.py --cancel <job>    # stop a job (and its bill) that runs on after Ctrl-C
    python setup_ml.py --cpu             # the tutorial's CPU profile (Standard_E16s_v3)
    python setup_ml.py -- --lora         # flags after -- go to fine_tune.py
    python setup_ml.py --local           # the same fine_tune.py command here
"""

import argparse
import itertools
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from azure.ai.ml import Input, Output, PyTorchDistribution, command
from azure.ai.ml.entities import AmlCompute, Environment

import config
from azure_steps import rehearsal
from azure_steps.client import OPENMPI_IMAGE, get_ml_client
from azure_steps.jobs import cancel, stream_to_the_end
from azure_steps.preflight import ClusterPlan, plan_cluster
from azure_steps.prices import cost_for

CONDA_FILE = config.ROOT / "conda.yml"
FINETUNING_DIR = config.ROOT / "finetuning_dir"  # Path to the fine-tuning script
TRAINING_ENV_NAME = "phi-3-training-environment"  # Name of the training environment
EXPERIMENT_NAME = "finetune-phi"
LOCAL_OUTPUTS = config.ROOT / "outputs"


@dataclass(frozen=True)
class ComputeProfile:
    instance_type: str
    compute_name: str
    docker_image: str
    max_hours: float  # the job's time limit (docs/azure-runtime.md says how each was chosen)


# Images at fixed tags (docs/azure-runtime.md, "Images"): the GPU job's CUDA 12.8.1 is torch 2.10's own.
GPU_IMAGE = "mcr.microsoft.com/azureml/openmpi5.0-cuda12.8-ubuntu24.04:20260715.v1"
CPU_IMAGE = OPENMPI_IMAGE
# Azure ML's own copy of the base model, mounted read-only (docs/azure-runtime.md, "The base model").
REGISTRY_BASE_MODEL = "azureml://registries/azureml/models/Phi-3.5-mini-instruct/versions/6"
GPU_PROFILE = ComputeProfile("Standard_NC24ads_A100_v4", "gpu-nc24s-a100-v4", GPU_IMAGE, max_hours=4)
CPU_PROFILE = ComputeProfile("Standard_E16s_v3", "cpu-e16s-v3", CPU_IMAGE, max_hours=6)
# The rehearsal runs the GPU job's own environment on the smallest cluster that holds it.
REHEARSAL_PROFILE = ComputeProfile(rehearsal.CLUSTER_SIZE, rehearsal.CLUSTER_NAME, GPU_IMAGE, rehearsal.MAX_HOURS)

# No trainer checkpoints in a job: they would land on the node's disk, gone when the job ends.
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


def submit_and_stream(ml_client, job, plan: ClusterPlan, max_hours, stream=True, setting="AZURE_ML_JOB_NAME"):
    """Submit the job, record its name in .env under `setting`, and stream its logs until it ends."""
    returned_job = ml_client.jobs.create_or_update(job)  # Submit the job
    config.save_settings(**{setting: returned_job.name})
    print(f"Job name: {returned_job.name} (recorded in .env as {setting} for deploy_model.py)")
    print(f"Studio URL: {returned_job.studio_url}")
    if not stream:
        print("Not streaming (--no-stream); follow the job in the studio.")
        return returned_job
    stream_to_the_end(ml_client, returned_job, plan.size.name, plan.nodes, max_hours)
    return returned_job


def job_run(args, extra_args):
    """What differs between the A100 (or --cpu) job and its rehearsal: (profile, nodes, inputs, job keywords)."""
    if args.rehearsal:
        return REHEARSAL_PROFILE, 1, *rehearsal.job_inputs(extra_args)
    inputs = {}
    if args.base_model == "registry":
        print(f"Base model: {REGISTRY_BASE_MODEL}, mounted read-only")
        inputs["model_name"] = Input(type="mlflow_model", path=REGISTRY_BASE_MODEL, mode="ro_mount")
    return CPU_PROFILE if args.cpu else GPU_PROFILE, args.instance_count, inputs, dict(extra_args=extra_args)


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
    parser.add_argument("--cpu", action="store_true", help="the tutorial's CPU profile: Standard_E16s_v3, cluster cpu-e16s-v3")
    parser.add_argument("--compute-name", help="compute cluster name (default: the profile's)")
    parser.add_argument("--compute-size", help="VM size of a new cluster (default: the profile's); several GPUs "
                        "run one process each")
    parser.add_argument("--location", default=None, help="region of a new cluster (default: the workspace's)")
    parser.add_argument("--max-hours", type=float, default=None, help="the job's time limit, after which Azure "
                        f"cancels it (default: {GPU_PROFILE.max_hours:g}; {CPU_PROFILE.max_hours:g} with --cpu; "
                        f"{REHEARSAL_PROFILE.max_hours:g} with --rehearsal)")
    parser.add_argument("--instance-count", type=int, default=1, help="nodes to train on (default: 1)")
    parser.add_argument("--no-stream", action="store_true", help="submit the job and return without streaming its logs")
    parser.add_argument("--no-int4", action="store_true", help="skip the int4 ONNX form (output quantized_model_output)")
    parser.add_argument("--model-name", help="model to fine-tune (default: microsoft/Phi-3.5-mini-instruct; a tiny "
                        "Phi-3 with --local)")
    parser.add_argument("--base-model", choices=("hub", "registry"), default="hub", help="take the base model "
                        "from the Hugging Face Hub or from Azure ML's registry, mounted read-only (default: hub)")
    parser.add_argument("--rehearsal", action="store_true", help="the same job for cents: a tiny Phi-3 on "
                        f"{REHEARSAL_PROFILE.instance_type} cluster {REHEARSAL_PROFILE.compute_name}; records "
                        f"{rehearsal.JOB_SETTING}")
    parser.add_argument("--cancel", metavar="JOB", help="cancel the job named JOB, and submit nothing")
    parser.add_argument("--local", action="store_true", help="run the same fine_tune.py command on this machine, "
                        "into outputs/models/<run>/model")
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
    args, extra_args = parse_args(argv)
    if args.local:
        return run_locally(args, extra_args)
    if args.cancel:
        return cancel(get_ml_client(), args.cancel)
    check_data_files()
    profile, nodes, inputs, job_args = job_run(args, extra_args)
    compute_name = args.compute_name or profile.compute_name
    max_hours = args.max_hours or profile.max_hours

    # Initialize ML Client
    ml_client = get_ml_client()
    # The pre-flight: everything is checked before anything is created or billed.
    plan = plan_cluster(ml_client, compute_name, args.compute_size or profile.instance_type, args.location, nodes)

    # Create Environment
    env = create_or_get_environment(ml_client, profile.docker_image)

    # Create or get existing compute cluster
    cluster = create_or_get_compute_cluster(ml_client, plan)
    processes = max(1, plan.size.gpus or 1)
    print(f"Training on {nodes} node(s) of {cluster.size}, {processes} process(es) per node (one per GPU)")
    print(f"Time limit: {max_hours:g} h, after which Azure cancels the job; the most a job that hangs can cost: "
          f"{cost_for(plan.size.name, max_hours, nodes)}")

    # Create and Submit Fine-Tuning Job, then stream its logs
    job = create_fine_tuning_job(env, compute_name, nodes, processes_per_node=processes, int4=not args.no_int4,
                                 require_gpu=plan.gpu, max_hours=max_hours, inputs=inputs, **job_args)
    setting = rehearsal.JOB_SETTING if args.rehearsal else "AZURE_ML_JOB_NAME"
    returned_job = submit_and_stream(ml_client, job, plan, max_hours, not args.no_stream, setting)
    if args.rehearsal:
        print("Next: `python deploy_model.py --rehearsal` deploys its int4 model on the smallest endpoint size and "
              "asks it one question through the flow.")
    return returned_job


if __name__ == "__main__":
    main()
