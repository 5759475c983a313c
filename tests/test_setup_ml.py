"""setup_ml.py against mocked Azure: the entities it builds, checked as the REST bodies they become."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml
from azure.ai.ml.entities import AmlCompute, Environment, JobService, VmSize
from azure.ai.ml.exceptions import ErrorTarget, JobException
from azure.core.exceptions import ResourceNotFoundError
from azure.identity import AzureCliCredential, CredentialUnavailableError

from azure_fakes import mocked_ml_client, poller
from conftest import ROOT, TINY_TRAINING_FLAGS, run_main, run_script

import config  # noqa: I001  (the same module object the scripts hold)
import ml_client as ml_client_module
import setup_ml

SETTINGS = {
    "AZURE_SUBSCRIPTION_ID": "00000000-1111-2222-3333-444444444444",
    "AZURE_RESOURCE_GROUP_NAME": "finetunephi-rg",
    "AZURE_ML_WORKSPACE_NAME": "finetunephi-workspace",
}


@pytest.fixture
def workspace(tmp_path, monkeypatch, chat_files):
    """Filled-in settings, data files in place, .env in tmp_path, and a mocked MLClient."""
    for name, value in SETTINGS.items():
        monkeypatch.setattr(config, name, value)
    monkeypatch.setattr(config, "ENV_FILE", tmp_path / ".env")
    monkeypatch.setattr(config, "TRAIN_DATA_PATH", str(chat_files[0]))
    monkeypatch.setattr(config, "TEST_DATA_PATH", str(chat_files[1]))
    monkeypatch.setattr(config, "AZURE_ML_JOB_NAME", "")  # save_settings() sets it; undone afterwards
    client = mocked_ml_client()
    client.environments.create_or_update.side_effect = lambda env: Environment(
        name=env.name, version="7", image=env.image, conda_file=env.conda_file
    )
    client.compute.get.side_effect = ResourceNotFoundError("not found")
    client.compute.begin_create_or_update.side_effect = lambda compute: poller(compute)
    # Azure's list of VM sizes of a region, as list_sizes returns it (an excerpt).
    client.compute.list_sizes.return_value = [
        VmSize(name="Standard_DS3_v2", v_cp_us=4, gpus=0),
        VmSize(name="Standard_E16s_v3", v_cp_us=16, gpus=0),
        VmSize(name="Standard_NC24ads_A100_v4", v_cp_us=24, gpus=1),
        VmSize(name="Standard_NC48ads_A100_v4", v_cp_us=48, gpus=2),
        VmSize(name="Standard_NC96ads_A100_v4", v_cp_us=96, gpus=4),
    ]
    # What jobs.create_or_update returns: the job, now with a name and a studio URL.
    client.jobs.create_or_update.side_effect = lambda job: _named(job, "shy_lamp_42")
    monkeypatch.setattr(setup_ml, "get_ml_client", lambda *needed: client)
    monkeypatch.setattr(config, "AZURE_ML_REHEARSAL_JOB_NAME", "")
    monkeypatch.setattr(setup_ml, "REHEARSAL_DIR", tmp_path / "rehearsal")
    yield client
    for name in ("AZURE_ML_JOB_NAME", "AZURE_ML_REHEARSAL_JOB_NAME"):
        os.environ.pop(name, None)  # save_settings() exported it


def _named(job, name):
    submitted = job._to_job()  # a new CommandJob, as the service returns
    submitted.name = name
    submitted.services = {"Studio": JobService(endpoint=f"https://ml.azure.com/runs/{name}")}
    return submitted


def submitted_job_body(client) -> dict:
    (job,), _ = client.jobs.create_or_update.call_args
    return job._to_job()._to_rest_object().as_dict()["properties"]


def created_compute_body(client) -> dict:
    (compute,), _ = client.compute.begin_create_or_update.call_args
    return compute._to_rest_object().as_dict()


def test_default_run_builds_the_tutorials_resources_and_job(workspace, capsys, chat_files, tmp_path):
    setup_ml.main([])

    (env,), _ = workspace.environments.create_or_update.call_args
    env_body = env._to_rest_object().as_dict()["properties"]
    assert env.name == "phi-3-training-environment"
    assert env_body["image"] == "mcr.microsoft.com/azureml/curated/acft-hf-nlp-gpu:127"  # Ubuntu 22.04, pinned
    assert yaml.safe_load(env_body["condaFile"]) == yaml.safe_load((ROOT / "conda.yml").read_text())

    workspace.compute.get.assert_called_once_with("gpu-nc24s-a100-v4")
    compute = created_compute_body(workspace)
    assert compute["location"] == "eastus2"
    assert compute["properties"]["computeType"] == "AmlCompute"
    assert compute["properties"]["properties"]["vmSize"] == "Standard_NC24ads_A100_v4"
    assert compute["properties"]["properties"]["vmPriority"] == "Dedicated"
    assert compute["properties"]["properties"]["scaleSettings"]["minNodeCount"] == 0
    assert compute["properties"]["properties"]["scaleSettings"]["maxNodeCount"] == 1

    job = submitted_job_body(workspace)
    assert job["command"] == (
        "python fine_tune.py --train-file ${{inputs.train_file}} --eval-file ${{inputs.eval_file}} "
        "--model_output_dir ${{outputs.model_output}} --quantized_output_dir ${{outputs.quantized_model_output}} "
        "--save-steps 0 --require_gpu"  # an A100 node: a torch that cannot see its GPU stops the job at once
    )
    assert job["codeId"] == str(ROOT / "finetuning_dir")
    assert job["computeId"] == "gpu-nc24s-a100-v4"
    assert job["environmentId"] == "azureml:phi-3-training-environment:7"
    assert job["inputs"] == {
        "train_file": {"uri": str(chat_files[0]), "jobInputType": "uri_file"},
        "eval_file": {"uri": str(chat_files[1]), "jobInputType": "uri_file"},
    }
    assert job["outputs"] == {
        "model_output": {"jobOutputType": "mlflow_model"},
        "quantized_model_output": {"jobOutputType": "mlflow_model"},  # the int4 form, beside the model
    }
    assert job["resources"]["instanceCount"] == 1
    assert "distribution" not in job
    assert job["experimentName"] == "finetune-phi"

    workspace.jobs.stream.assert_called_once_with("shy_lamp_42")
    out = capsys.readouterr().out
    assert "Job name: shy_lamp_42" in out and "Studio URL: https://ml.azure.com/runs/shy_lamp_42" in out
    assert "AZURE_ML_JOB_NAME=shy_lamp_42" in (tmp_path / ".env").read_text()


def test_existing_cluster_is_reused(workspace):
    workspace.compute.get.side_effect = None
    workspace.compute.get.return_value = AmlCompute(name="gpu-nc24s-a100-v4", size="Standard_NC24ads_A100_v4", max_instances=1)
    setup_ml.main([])
    workspace.compute.begin_create_or_update.assert_not_called()
    assert submitted_job_body(workspace)["computeId"] == "gpu-nc24s-a100-v4"


def test_cpu_profile_and_overrides(workspace):
    setup_ml.main(["--cpu", "--location", "westus3"])
    (env,), _ = workspace.environments.create_or_update.call_args
    assert env.image == "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:20250701.v1"  # supported, dated tag
    assert "--require_gpu" not in submitted_job_body(workspace)["command"]
    compute = created_compute_body(workspace)
    assert compute["properties"]["properties"]["vmSize"] == "Standard_E16s_v3"
    assert compute["location"] == "westus3"
    assert submitted_job_body(workspace)["computeId"] == "cpu-e16s-v3"

    setup_ml.main(["--compute-name", "my-a100s", "--compute-size", "Standard_NC48ads_A100_v4"])
    assert created_compute_body(workspace)["properties"]["properties"]["vmSize"] == "Standard_NC48ads_A100_v4"
    assert submitted_job_body(workspace)["computeId"] == "my-a100s"


def test_instance_count_uses_pytorch_distribution_and_grows_the_cluster(workspace):
    workspace.compute.get.side_effect = None
    workspace.compute.get.return_value = AmlCompute(name="gpu-nc24s-a100-v4", size="Standard_NC24ads_A100_v4", max_instances=1)
    setup_ml.main(["--instance-count", "2"])
    job = submitted_job_body(workspace)
    assert job["resources"]["instanceCount"] == 2
    assert job["distribution"] == {"distributionType": "PyTorch", "processCountPerInstance": 1}
    assert created_compute_body(workspace)["properties"]["properties"]["scaleSettings"]["maxNodeCount"] == 2


@pytest.mark.parametrize("size, processes", [("Standard_NC48ads_A100_v4", 2), ("Standard_NC96ads_A100_v4", 4)])
def test_a_multi_gpu_size_runs_one_process_per_gpu(workspace, capsys, size, processes):
    setup_ml.main(["--compute-size", size, "--location", "westus3"])
    workspace.compute.list_sizes.assert_called_once_with(location="westus3")
    job = submitted_job_body(workspace)
    assert job["resources"]["instanceCount"] == 1
    assert job["distribution"] == {"distributionType": "PyTorch", "processCountPerInstance": processes}
    assert f"1 node(s) of {size}, {processes} process(es) per node" in capsys.readouterr().out


def test_the_gpu_count_is_the_existing_clusters(workspace):
    # A reused cluster keeps its own size: its GPUs decide, not --compute-size.
    workspace.compute.get.side_effect = None
    workspace.compute.get.return_value = AmlCompute(
        name="gpu-nc24s-a100-v4", size="Standard_NC96ads_A100_v4", location="eastus2", max_instances=2
    )
    setup_ml.main(["--instance-count", "2"])
    workspace.compute.list_sizes.assert_called_once_with(location="eastus2")
    assert submitted_job_body(workspace)["distribution"] == {"distributionType": "PyTorch", "processCountPerInstance": 4}


def test_cpu_and_unknown_sizes_run_one_process(workspace, capsys):
    setup_ml.main(["--cpu"])
    assert "distribution" not in submitted_job_body(workspace)
    setup_ml.main(["--compute-size", "Standard_XYZ_v9"])
    assert "distribution" not in submitted_job_body(workspace)
    assert "Standard_XYZ_v9 is not in" in capsys.readouterr().out


def test_fine_tune_flags_and_model_name_reach_the_job_command(workspace):
    setup_ml.main(["--model-name", "microsoft/Phi-3-mini-4k-instruct", "--", "--lora", "--epochs", "1", "--checkpoint_dir", "a b"])
    assert submitted_job_body(workspace)["command"].endswith(
        "--model_output_dir ${{outputs.model_output}} --quantized_output_dir ${{outputs.quantized_model_output}} "
        "--save-steps 0 --require_gpu --model-name microsoft/Phi-3-mini-4k-instruct "
        "--lora --epochs 1 --checkpoint_dir 'a b'"
    )


def test_no_int4_leaves_out_the_second_output(workspace):
    setup_ml.main(["--no-int4"])
    job = submitted_job_body(workspace)
    assert job["outputs"] == {"model_output": {"jobOutputType": "mlflow_model"}}
    assert "quantized" not in job["command"]


def test_no_stream_submits_and_returns(workspace, tmp_path):
    setup_ml.main(["--no-stream"])
    workspace.jobs.create_or_update.assert_called_once()
    workspace.jobs.stream.assert_not_called()
    assert "AZURE_ML_JOB_NAME=shy_lamp_42" in (tmp_path / ".env").read_text()


def test_failed_job_ends_with_one_line_and_non_zero_exit(workspace, tmp_path):
    error = {"code": "UserError", "message": "CUDA out of memory"}
    workspace.jobs.stream.side_effect = JobException(
        message="Exception : \n {} ".format(json.dumps(error, indent=4)),
        target=ErrorTarget.JOB,
        no_personal_data_message="failed",
    )
    with pytest.raises(SystemExit) as stop:
        setup_ml.main([])
    message = str(stop.value)
    assert message.startswith("setup_ml.py: job shy_lamp_42 failed: {")
    assert message.endswith("see its logs at https://ml.azure.com/runs/shy_lamp_42")
    assert "\n" not in message
    # The job name was recorded before streaming, so its logs and model stay reachable.
    assert "AZURE_ML_JOB_NAME=shy_lamp_42" in (tmp_path / ".env").read_text()


def test_missing_data_file_stops_before_azure(workspace, monkeypatch, tmp_path):
    monkeypatch.setattr(config, "TRAIN_DATA_PATH", str(tmp_path / "missing.jsonl"))
    with pytest.raises(SystemExit) as stop:
        setup_ml.main([])
    assert str(stop.value) == f"setup_ml.py: {tmp_path / 'missing.jsonl'} not found; run `python download_dataset.py` first"
    workspace.environments.create_or_update.assert_not_called()


def test_missing_login_is_one_line(monkeypatch):
    for name, value in SETTINGS.items():
        monkeypatch.setattr(config, name, value)
    credential = create_credential_without_login()
    monkeypatch.setattr(ml_client_module, "AzureCliCredential", lambda: credential)
    built = []
    monkeypatch.setattr(ml_client_module, "MLClient", lambda *a: built.append(a))
    with pytest.raises(SystemExit) as stop:
        ml_client_module.get_ml_client()
    assert str(stop.value) == (
        "Azure CLI login needed (Please run 'az login' to set up an account); run `az login` "
        "(or `az login --use-device-code`) and select the subscription in AZURE_SUBSCRIPTION_ID"
    )
    credential.get_token.assert_called_once_with("https://management.azure.com/.default")
    assert built == []


def create_credential_without_login():
    from unittest.mock import create_autospec

    credential = create_autospec(AzureCliCredential, instance=True)
    credential.get_token.side_effect = CredentialUnavailableError(message="Please run 'az login' to set up an account")
    return credential


def test_unfilled_placeholder_stops_before_any_azure_call(tmp_path):
    # A real run of the script: no settings anywhere, so the first placeholder stops it.
    result = run_script([ROOT / "setup_ml.py"], cwd=tmp_path, env={"TRAIN_DATA_PATH": str(ROOT / "README.md"),
                                                                    "TEST_DATA_PATH": str(ROOT / "README.md")})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "config: AZURE_SUBSCRIPTION_ID is still the placeholder 'your_subscription_id'; "
        "set it in .env (copy .env.example) or export AZURE_SUBSCRIPTION_ID=..."
    ]


def test_local_runs_the_jobs_command_here(workspace, monkeypatch, tmp_path, tiny_model_dir, capsys):
    monkeypatch.setattr(setup_ml, "LOCAL_OUTPUTS", tmp_path / "outputs")
    # A few steps: what is checked here is the command and where it writes, not what the model learns.
    model_dir = setup_ml.main(["--local", "--model-name", str(tiny_model_dir), "--", *TINY_TRAINING_FLAGS,
                               "--max-steps", "4"])
    assert (model_dir / "MLmodel").is_file()
    assert (model_dir.parent / "model-int4" / "MLmodel").is_file(), "the int4 form, as the job writes it"
    assert model_dir.parent.parent == tmp_path / "outputs" / "models"
    assert (model_dir.parent / "checkpoints").is_dir()
    ran = capsys.readouterr().out
    assert "Running locally in finetuning_dir/: " in ran
    assert " fine_tune.py --train-file " in ran and f"--model-name {tiny_model_dir}" in ran
    # Nothing went to Azure.
    for group in ("environments", "compute", "jobs"):
        assert getattr(workspace, group).method_calls == []


def test_help_explains_every_flag():
    result = run_script([ROOT / "setup_ml.py", "--help"], cwd=ROOT)
    assert result.returncode == 0
    for flag in ("--cpu", "--compute-name", "--compute-size", "--location", "--instance-count", "--no-stream",
                 "--no-int4", "--model-name", "--local", "--rehearsal", "after --"):
        assert flag in result.stdout, flag


def job_command_here(body: dict, values: dict) -> list[str]:
    """The job's command line with its ${{...}} placeholders replaced, as the node runs it."""
    command = body["command"]
    for placeholder, value in values.items():
        command = command.replace("${{" + placeholder + "}}", str(value))
    assert "${{" not in command, command
    return shlex.split(command)


def test_the_rehearsal_submits_the_real_job_with_a_tiny_model_on_a_small_cpu_cluster(workspace, tmp_path, capsys):
    setup_ml.main(["--rehearsal", "--no-stream"])
    (env,), _ = workspace.environments.create_or_update.call_args
    assert env.name == "phi-3-training-environment" and env.image == setup_ml.GPU_IMAGE  # the A100 job's own
    compute = created_compute_body(workspace)["properties"]["properties"]
    assert compute["vmSize"] == "Standard_DS3_v2"
    assert compute["scaleSettings"]["minNodeCount"] == 0 and compute["scaleSettings"]["maxNodeCount"] == 1
    job = submitted_job_body(workspace)
    assert job["computeId"] == "cpu-rehearsal" and job["displayName"] == "fine-tune-phi-3-rehearsal"
    assert job["codeId"] == str(ROOT / "finetuning_dir")
    assert job["outputs"] == {
        "model_output": {"jobOutputType": "mlflow_model"},
        "quantized_model_output": {"jobOutputType": "mlflow_model"},
    }
    folder = tmp_path / "rehearsal"
    assert job["inputs"] == {
        "train_file": {"uri": str(folder / "train_data.jsonl"), "jobInputType": "uri_file"},
        "eval_file": {"uri": str(folder / "test_data.jsonl"), "jobInputType": "uri_file"},
        "model_name": {"uri": str(folder / "tiny-phi3"), "jobInputType": "uri_folder"},  # uploaded from here
    }
    assert job["command"] == (
        "python fine_tune.py --train-file ${{inputs.train_file}} --eval-file ${{inputs.eval_file}} "
        "--model_output_dir ${{outputs.model_output}} --quantized_output_dir ${{outputs.quantized_model_output}} "
        "--save-steps 0 --model-name ${{inputs.model_name}} " + shlex.join(TINY_TRAINING_FLAGS)
    )
    assert len((folder / "train_data.jsonl").read_text().splitlines()) == 40
    assert len((folder / "test_data.jsonl").read_text().splitlines()) == 10
    assert (folder / "tiny-phi3" / "config.json").is_file()
    assert "AZURE_ML_REHEARSAL_JOB_NAME=shy_lamp_42" in (tmp_path / ".env").read_text()
    assert "AZURE_ML_JOB_NAME" not in (tmp_path / ".env").read_text(), "deploy_model.py's default job is untouched"
    assert "python deploy_model.py --rehearsal" in capsys.readouterr().out


def test_the_rehearsal_command_writes_both_models_into_mount_points(workspace, tmp_path):
    # What Azure hands the job: a copy of finetuning_dir/ as the working folder (the code snapshot),
    # read-only inputs, and each output an empty folder that is a mount point of its own (rw_mount):
    # it can be written into, but not removed, replaced or renamed. Bind mounts in a private mount
    # namespace make them real mount points here.
    setup_ml.main(["--rehearsal", "--no-stream"])
    body = submitted_job_body(workspace)
    inputs = tmp_path / "rehearsal"  # the job's three inputs live here
    snapshot = tmp_path / "wd"
    shutil.copytree(ROOT / "finetuning_dir", snapshot, ignore=shutil.ignore_patterns("__pycache__", "mlruns", "checkpoints"))
    outputs = {name: tmp_path / "outputs" / name for name in ("model_output", "quantized_model_output")}
    for folder in outputs.values():
        folder.mkdir(parents=True)
    args = job_command_here(body, {
        "inputs.train_file": inputs / "train_data.jsonl", "inputs.eval_file": inputs / "test_data.jsonl",
        "inputs.model_name": inputs / "tiny-phi3", **{f"outputs.{k}": v for k, v in outputs.items()},
    }) + ["--max-steps", "4"]  # a few steps: the mounts are what is checked here
    mounts = " && ".join(
        [f"mount --bind {shlex.quote(str(f))} {shlex.quote(str(f))}" for f in outputs.values()]
        + [f"mount --bind {inputs} {inputs}", f"mount -o remount,bind,ro {inputs}"]
    )
    script = f'{mounts} || exit 98; if touch {inputs}/probe 2>/dev/null; then exit 99; fi; exec "$@"'
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", script, "bash", sys.executable, *args[1:]],
        cwd=snapshot, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode not in (98, 99), f"the mounts were not made ({result.returncode}): {result.stderr}"
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (outputs["model_output"] / "MLmodel").is_file() and (outputs["model_output"] / "model" / "config.json").is_file()
    assert (outputs["quantized_model_output"] / "MLmodel").is_file()
    assert (outputs["quantized_model_output"] / "artifacts" / "onnx" / "genai_config.json").is_file()
    # Nothing but the outputs was written where Azure uploads (./outputs) or keeps (checkpoints).
    written = sorted(p.name for p in snapshot.iterdir())
    assert "outputs" not in written and "mlruns" not in written, written
    assert not list(snapshot.rglob("checkpoint-*")), "the job writes no trainer checkpoints"
    assert "test loss" in result.stdout.strip().splitlines()[-1]


def test_the_gpu_jobs_command_stops_at_once_on_a_machine_without_a_gpu(workspace, tmp_path, chat_files):
    setup_ml.main(["--no-stream"])  # the A100 profile
    body = submitted_job_body(workspace)
    outputs = {name: tmp_path / name for name in ("model_output", "quantized_model_output")}
    args = job_command_here(body, {
        "inputs.train_file": chat_files[0], "inputs.eval_file": chat_files[1],
        **{f"outputs.{k}": v for k, v in outputs.items()},
    })
    assert args[1] == "fine_tune.py"
    import fine_tune  # its main() in this process: a new one would spend its first seconds importing

    result = run_main(lambda argv: fine_tune.main(fine_tune.parse_args(argv)), args[2:], cwd=tmp_path)
    assert result.returncode == 1  # and the default model, the Hub's, was never reached
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("fine_tune.py: --require_gpu, but torch sees no usable GPU: torch ")
    assert "torch.version.cuda = " in line and "torch.cuda.device_count() = 0" in line
    assert line.endswith("or drop --require_gpu to train on the CPU")
    assert not any(folder.exists() for folder in outputs.values())
