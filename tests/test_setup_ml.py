"""setup_ml.py against mocked Azure: the entities it builds, checked as the REST bodies they become."""

import json
import os
import shlex
import shutil

import pytest
import yaml
from azure.ai.ml.entities import AmlCompute, Environment, JobService, VmSize
from azure.ai.ml.exceptions import ErrorTarget, JobException
from azure.core.exceptions import ResourceNotFoundError
from azure.identity import AzureCliCredential, CredentialUnavailableError

from azure_fakes import mocked_ml_client, poller
from conftest import ROOT, TINY_TRAINING_FLAGS, run_script

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
        VmSize(name="Standard_E16s_v3", v_cp_us=16, gpus=0),
        VmSize(name="Standard_NC24ads_A100_v4", v_cp_us=24, gpus=1),
        VmSize(name="Standard_NC48ads_A100_v4", v_cp_us=48, gpus=2),
        VmSize(name="Standard_NC96ads_A100_v4", v_cp_us=96, gpus=4),
    ]
    # What jobs.create_or_update returns: the job, now with a name and a studio URL.
    client.jobs.create_or_update.side_effect = lambda job: _named(job, "shy_lamp_42")
    monkeypatch.setattr(setup_ml, "get_ml_client", lambda *needed: client)
    yield client
    os.environ.pop("AZURE_ML_JOB_NAME", None)  # save_settings() exported it


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
    assert env_body["image"] == "mcr.microsoft.com/azureml/curated/acft-hf-nlp-gpu:59"
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
        "--save-steps 0"
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
    assert env.image == "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu20.04:latest"
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
        "--save-steps 0 --model-name microsoft/Phi-3-mini-4k-instruct "
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
    model_dir = setup_ml.main(["--local", "--model-name", str(tiny_model_dir), "--", *TINY_TRAINING_FLAGS])
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
                 "--no-int4", "--model-name", "--local", "after --"):
        assert flag in result.stdout, flag


def test_the_jobs_command_uploads_only_the_model(workspace, tmp_path, tiny_model_dir, chat_files):
    # Azure ML uploads a job's ./outputs and its declared outputs. Run the job's own command line in a
    # copy of its code folder, as the node would, and see what lands where.
    setup_ml.main(["--no-stream"])
    command = submitted_job_body(workspace)["command"]
    snapshot = tmp_path / "wd"
    # What Azure ML snapshots: the folder less what .gitignore names.
    shutil.copytree(ROOT / "finetuning_dir", snapshot, ignore=shutil.ignore_patterns("__pycache__", "mlruns", "checkpoints"))
    model_output, int4_output = tmp_path / "model_output", tmp_path / "quantized_model_output"
    command = (command.replace("${{inputs.train_file}}", str(chat_files[0]))
               .replace("${{inputs.eval_file}}", str(chat_files[1]))
               .replace("${{outputs.model_output}}", str(model_output))
               .replace("${{outputs.quantized_model_output}}", str(int4_output)))
    args = shlex.split(command)[1:] + ["--model-name", str(tiny_model_dir), "--max-steps", "3", "--max-length", "256"]
    result = run_script(args, cwd=snapshot)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (model_output / "MLmodel").is_file() and (int4_output / "MLmodel").is_file()
    written = sorted(p.name for p in snapshot.iterdir())
    assert "outputs" not in written and "mlruns" not in written, written
    assert not list(snapshot.rglob("checkpoint-*")), "the job writes no trainer checkpoints"
    sizes = [sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 2**20 for out in (model_output, int4_output)]
    print(f"the job uploads its two model outputs ({sizes[0]:.1f} and {sizes[1]:.1f} MiB) and nothing under ./outputs")
