"""setup_ml.py against mocked Azure: the entities it builds, checked as the REST bodies they become."""

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest
import yaml
from azure.ai.ml.entities import AmlCompute, Environment, JobService, Workspace
from azure.ai.ml.exceptions import ErrorTarget, JobException
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from azure.identity import AzureCliCredential, CredentialUnavailableError

from azure_fakes import listed_size, listed_usage, mocked_ml_client, poller
from conftest import ROOT, TINY_TRAINING_FLAGS, options_without_help, run_main, run_script

import config  # noqa: I001  (the same module object the scripts hold)
from azure_steps import client as ml_client_module
import setup_ml
from azure_steps import rehearsal

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
    client.compute.list_sizes.return_value = SIZES
    # The workspace and the subscription's quota in its region, with room for every profile.
    client.workspaces.get.return_value = Workspace(name="finetunephi-workspace", location="eastus2")
    client.compute.list_usage.return_value = [
        listed_usage("standardDSv2Family", used=0, limit=10),
        listed_usage("standardESv3Family", used=0, limit=32),
        listed_usage("standardNCADSA100v4Family", used=0, limit=96),
    ]
    # What jobs.create_or_update returns: the job, now with a name and a studio URL.
    client.jobs.create_or_update.side_effect = lambda job: _named(job, "shy_lamp_42")
    client.jobs.get.side_effect = lambda name: _named(setup_ml.create_fine_tuning_job(
        Environment(name="e", version="1"), "c"), name, "Completed")  # where a streamed job ended
    client.compute.list_nodes.return_value = []  # a reused cluster's nodes now
    monkeypatch.setattr(setup_ml, "get_ml_client", lambda *needed: client)
    monkeypatch.setattr(config, "AZURE_ML_REHEARSAL_JOB_NAME", "")
    monkeypatch.setattr(rehearsal, "FOLDER", tmp_path / "rehearsal")
    yield client
    for name in ("AZURE_ML_JOB_NAME", "AZURE_ML_REHEARSAL_JOB_NAME"):
        os.environ.pop(name, None)  # save_settings() exported it


SIZES = [
    listed_size("Standard_DS3_v2", "standardDSv2Family", 4),
    listed_size("Standard_E16s_v3", "standardESv3Family", 16),
    listed_size("Standard_NC24ads_A100_v4", "standardNCADSA100v4Family", 24, gpus=1),
    listed_size("Standard_NC48ads_A100_v4", "standardNCADSA100v4Family", 48, gpus=2),
    listed_size("Standard_NC96ads_A100_v4", "standardNCADSA100v4Family", 96, gpus=4),
]


def _named(job, name, status=None):
    submitted = job._to_job()  # a new CommandJob, as the service returns
    submitted.name = name
    submitted._status = status
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
    # Azure ML's supported CUDA 12.8.1 base image (torch 2.10's CUDA), at a dated tag
    assert env_body["image"] == "mcr.microsoft.com/azureml/openmpi5.0-cuda12.8-ubuntu24.04:20260715.v1"
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
    workspace.compute.list_usage.return_value = [listed_usage("standardNCADSA100v4Family", used=0, limit=192)]
    setup_ml.main(["--instance-count", "2"])
    workspace.compute.list_sizes.assert_called_once_with(location="eastus2")
    assert submitted_job_body(workspace)["distribution"] == {"distributionType": "PyTorch", "processCountPerInstance": 4}


SIZES_FORBIDDEN = HttpResponseError(
    message="(AuthorizationFailed) The client has no authorization to perform action "
            "'Microsoft.MachineLearningServices/locations/vmSizes/read'\nCode: AuthorizationFailed")


def test_cpu_and_unknown_sizes_run_one_process(workspace, capsys):
    setup_ml.main(["--cpu"])
    assert "distribution" not in submitted_job_body(workspace)
    workspace.compute.list_sizes.side_effect = SIZES_FORBIDDEN
    setup_ml.main(["--compute-size", "Standard_XYZ_v9"])
    assert "distribution" not in submitted_job_body(workspace)


def test_a_size_the_region_does_not_offer_stops_before_anything_is_created(workspace):
    with pytest.raises(SystemExit) as stop:
        setup_ml.main(["--compute-size", "Standard_ND96isr_H100_v5"])
    assert "Standard_ND96isr_H100_v5" in str(stop.value) and "eastus2" in str(stop.value)
    workspace.environments.create_or_update.assert_not_called()
    workspace.compute.begin_create_or_update.assert_not_called()


def test_an_unreadable_size_list_is_said_and_the_run_goes_on(workspace, capsys):
    workspace.compute.list_sizes.side_effect = SIZES_FORBIDDEN
    setup_ml.main([])
    out = capsys.readouterr().out
    said = next(line for line in out.splitlines() if "list of VM sizes" in line)
    assert "eastus2" in said and "AuthorizationFailed" in said and "going on" in said
    assert "quota cannot be checked" in out  # without the size's family, its quota is unknown too
    workspace.jobs.create_or_update.assert_called_once()


def test_a_family_the_regions_quota_list_lacks_stops_before_anything_is_created(workspace):
    workspace.compute.list_usage.return_value = [listed_usage("standardDSv2Family", used=0, limit=10)]
    with pytest.raises(SystemExit) as stop:
        setup_ml.main([])
    assert "standardNCADSA100v4Family" in str(stop.value) and "eastus2" in str(stop.value)
    workspace.compute.begin_create_or_update.assert_not_called()


def test_the_family_is_found_by_the_label_of_microsofts_usage_example(workspace, capsys):
    # azure-rest-api-specs' Usage/list.json writes the label where the family's name would be.
    workspace.compute.list_usage.return_value = [listed_usage(
        "Standard NCADS_A100_v4 Family Cluster Dedicated vCPUs", used=0, limit=24)]
    setup_ml.main([])
    assert "needs 24 standardNCADSA100v4Family vCPUs in eastus2; there is room" in capsys.readouterr().out


@pytest.mark.parametrize("size, listed, require_gpu, said", [
    ("Standard_NC24ads_A100_v4", True, True, None),  # the list says 1 GPU
    ("Standard_DS3_v2", True, False, None),  # the list says no GPU
    ("Standard_ND96isr_H100_v5", False, True, "Standard_ND96isr_H100_v5 is an N-series (GPU) size; the job passes --require_gpu"),
    ("Standard_NV36ads_A10_v5", False, True, "Standard_NV36ads_A10_v5 is an N-series (GPU) size"),
    ("Standard_E8s_v5", False, False, None),  # a CPU-only series, even when not listed
    ("Standard_XYZ_v9", False, True, "Standard_XYZ_v9 cannot be classified as a GPU or CPU size, so the GPU check stays on"),
    ("my_own_size", False, True, "my_own_size cannot be classified as a GPU or CPU size, so the GPU check stays on"),
])
def test_the_gpu_check_is_decided_from_the_size_and_never_dropped_silently(workspace, capsys, size, listed,
                                                                           require_gpu, said):
    assert any(s.name == size for s in SIZES) == listed
    if not listed:  # only an unreadable list leaves a size's GPUs unknown
        workspace.compute.list_sizes.side_effect = SIZES_FORBIDDEN
    setup_ml.main(["--compute-size", size])
    assert ("--require_gpu" in submitted_job_body(workspace)["command"]) == require_gpu
    out = capsys.readouterr().out
    if said:
        assert said in out


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


def sdk_job_exception(message: str, interrupted=False) -> JobException:
    """A JobException as azure-ai-ml's stream_logs_until_completion raises it (from KeyboardInterrupt on Ctrl-C)."""
    error = JobException(message=message, target=ErrorTarget.JOB, no_personal_data_message=message)
    if interrupted:
        error.__cause__ = KeyboardInterrupt()
    return error


def test_a_failed_job_ends_with_azures_error_code_and_message(workspace, tmp_path):
    error = {"error": {"code": "UserError", "message": "Execution failed. User process 'python' exited with status "
                       "code 1. Please check log file 'user_logs/std_log.txt' for error details."}}
    workspace.jobs.stream.side_effect = sdk_job_exception("Exception : \n {} ".format(json.dumps(error, indent=4)))
    with pytest.raises(SystemExit) as stop:
        setup_ml.main([])
    message = str(stop.value)
    assert "shy_lamp_42" in message and "failed" in message
    assert "UserError" in message and "exited with status code 1" in message and "user_logs/std_log.txt" in message
    assert "https://ml.azure.com/runs/shy_lamp_42" in message and "\n" not in message
    # The job name was recorded before streaming, so its logs and model stay reachable.
    assert "AZURE_ML_JOB_NAME=shy_lamp_42" in (tmp_path / ".env").read_text()


def test_a_failed_jobs_traceback_is_told_by_its_first_and_last_lines(workspace):
    message = ("Execution failed. User process 'python' exited with status code 1.\nError: Traceback (most recent "
               "call last):\n  File \"fine_tune.py\", line 9, in <module>\ntorch.OutOfMemoryError: CUDA out of memory")
    error = {"error": {"code": "UserError", "message": message}}
    workspace.jobs.stream.side_effect = sdk_job_exception("Exception : \n {} ".format(json.dumps(error, indent=4)))
    with pytest.raises(SystemExit) as stop:
        setup_ml.main([])
    told = str(stop.value)
    assert "exited with status code 1" in told and "torch.OutOfMemoryError: CUDA out of memory" in told
    assert "\n" not in told


def test_ctrl_c_while_streaming_says_the_job_still_bills_and_how_to_cancel_it(workspace, capsys):
    workspace.jobs.stream.side_effect = sdk_job_exception(
        "The output streaming for the run interrupted.\nBut the run is still executing on the compute target. \n"
        "Details for canceling the run can be found here: https://aka.ms/aml-docs-cancel-run", interrupted=True)
    with pytest.raises(SystemExit) as stop:
        setup_ml.main([])
    told = capsys.readouterr().err
    assert stop.value.code == 130
    assert "shy_lamp_42 still runs" in told
    assert "US$3.67/h" in told and "4 h" in told and "US$14.68" in told  # its price an hour, its time limit
    assert "python setup_ml.py --cancel shy_lamp_42" in told
    assert "failed" not in told


@pytest.mark.parametrize("status, why", [("Canceled", "time limit"), ("NotResponding", "lost contact")])
def test_a_job_that_ends_other_than_completed_exits_non_zero_in_one_line(workspace, status, why):
    from azure.ai.ml._restclient.arm_ml_service.models import JobStatus

    workspace.jobs.get.side_effect = lambda name: _named(setup_ml.create_fine_tuning_job(
        Environment(name="e", version="1"), "c"), name, JobStatus(status))  # a str enum, as the service's job has
    with pytest.raises(SystemExit) as stop:
        setup_ml.main([])
    message = str(stop.value)
    assert f"shy_lamp_42 ended {status}" in message and why in message and "\n" not in message


def test_cancel_cancels_the_named_job_and_submits_nothing(workspace, capsys):
    workspace.jobs.begin_cancel.return_value = poller(None)
    setup_ml.main(["--cancel", "shy_lamp_42"])
    workspace.jobs.begin_cancel.assert_called_once_with("shy_lamp_42")
    workspace.jobs.create_or_update.assert_not_called()
    assert "Canceled job shy_lamp_42" in capsys.readouterr().out


def test_cancel_of_an_unknown_job_is_one_line(workspace):
    workspace.jobs.begin_cancel.side_effect = ResourceNotFoundError("not found")
    with pytest.raises(SystemExit) as stop:
        setup_ml.main(["--cancel", "nope_1"])
    assert "nope_1" in str(stop.value) and "\n" not in str(stop.value)


def test_missing_data_file_stops_before_azure(workspace, monkeypatch, tmp_path):
    monkeypatch.setattr(config, "TRAIN_DATA_PATH", str(tmp_path / "missing.jsonl"))
    with pytest.raises(SystemExit) as stop:
        setup_ml.main([])
    assert str(tmp_path / "missing.jsonl") in str(stop.value) and "`python download_dataset.py`" in str(stop.value)
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
    assert "Please run 'az login' to set up an account" in str(stop.value)  # the credential's own reason
    assert "`az login`" in str(stop.value) and "AZURE_SUBSCRIPTION_ID" in str(stop.value)
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
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr
    assert options_without_help(setup_ml.parse_args) == []


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


def code_snapshot_and_outputs(tmp_path, names=("model_output", "quantized_model_output")):
    """A copy of finetuning_dir/ (Azure's code snapshot) and an empty folder for each output."""
    snapshot = tmp_path / "wd"
    shutil.copytree(ROOT / "finetuning_dir", snapshot, ignore=shutil.ignore_patterns("__pycache__", "mlruns", "checkpoints"))
    outputs = {name: tmp_path / "outputs" / name for name in names}
    for folder in outputs.values():
        folder.mkdir(parents=True)
    return snapshot, outputs


def run_in_mounts(args, snapshot, outputs, read_only):
    """The job's command in `snapshot`, each output folder a mount point of its own and each `read_only`
    folder remounted read-only, in a private mount namespace, as Azure mounts them."""
    mounts = " && ".join(
        [f"mount --bind {shlex.quote(str(f))} {shlex.quote(str(f))}" for f in outputs]
        + [f"mount --bind {shlex.quote(str(f))} {shlex.quote(str(f))} && mount -o remount,bind,ro {shlex.quote(str(f))}"
           for f in read_only]
    )
    probes = " || ".join(f"touch {shlex.quote(str(f))}/probe 2>/dev/null" for f in read_only)
    script = f'{mounts} || exit 98; if {probes}; then exit 99; fi; exec "$@"'
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", script, "bash", sys.executable, *args[1:]],
        cwd=snapshot, capture_output=True, text=True, timeout=600,
    )


def test_the_rehearsal_command_writes_both_models_into_mount_points(workspace, tmp_path):
    # What Azure hands the job: a copy of finetuning_dir/ as the working folder (the code snapshot),
    # read-only inputs, and each output an empty folder that is a mount point of its own (rw_mount):
    # it can be written into, but not removed, replaced or renamed. Bind mounts in a private mount
    # namespace make them real mount points here.
    setup_ml.main(["--rehearsal", "--no-stream"])
    body = submitted_job_body(workspace)
    inputs = tmp_path / "rehearsal"  # the job's three inputs live here
    snapshot, outputs = code_snapshot_and_outputs(tmp_path)
    args = job_command_here(body, {
        "inputs.train_file": inputs / "train_data.jsonl", "inputs.eval_file": inputs / "test_data.jsonl",
        "inputs.model_name": inputs / "tiny-phi3", **{f"outputs.{k}": v for k, v in outputs.items()},
    }) + ["--max-steps", "4"]  # a few steps: the mounts are what is checked here
    result = run_in_mounts(args, snapshot, outputs.values(), [inputs])
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


def nothing_created(client):
    client.environments.create_or_update.assert_not_called()
    client.compute.begin_create_or_update.assert_not_called()
    client.jobs.create_or_update.assert_not_called()


LIMITS = {"standardDSv2Family": 10, "standardESv3Family": 32, "standardNCADSA100v4Family": 24}


@pytest.mark.parametrize("argv, cluster, family, needed", [
    ([], "gpu-nc24s-a100-v4' (1 x Standard_NC24ads_A100_v4)", "standardNCADSA100v4Family", 24),
    (["--cpu"], "cpu-e16s-v3' (1 x Standard_E16s_v3)", "standardESv3Family", 16),
    (["--rehearsal"], "cpu-rehearsal' (1 x Standard_DS3_v2)", "standardDSv2Family", 4),
    (["--instance-count", "2"], "gpu-nc24s-a100-v4' (2 x Standard_NC24ads_A100_v4)", "standardNCADSA100v4Family", 48),
])
def test_short_quota_stops_before_anything_is_created(workspace, argv, cluster, family, needed):
    # Every family at its limit but for 3 vCPUs (most subscriptions start with 0 A100 vCPUs at all).
    workspace.compute.list_usage.return_value = [listed_usage(name, used=limit - 3, limit=limit)
                                                 for name, limit in LIMITS.items()]
    with pytest.raises(SystemExit) as stop:
        setup_ml.main(argv)
    message = str(stop.value)
    assert f"cluster '{cluster}" in message and f"{family} in eastus2" in message
    assert f"needs {needed} vCPUs, 3 available ({LIMITS[family] - 3} of {LIMITS[family]} in use)" in message
    assert "https://ml.azure.com/quota" in message
    workspace.compute.list_usage.assert_called_once_with(location="eastus2")
    nothing_created(workspace)


def test_a_workspaces_share_of_a_family_is_not_the_subscriptions_quota(workspace):
    # list_usage also returns each workspace's own usage of a family; only the subscription's counts.
    workspace.compute.list_usage.return_value = [
        listed_usage("standardNCADSA100v4Family", used=0, limit=96, workspace="finetunephi-workspace"),
        listed_usage("standardNCADSA100v4Family", used=0, limit=0),
    ]
    with pytest.raises(SystemExit) as stop:
        setup_ml.main([])
    assert "needs 24 vCPUs, 0 available (0 of 0 in use)" in str(stop.value)
    nothing_created(workspace)


def test_the_regions_total_counts_and_low_priority_entries_do_not(workspace):
    workspace.compute.list_usage.return_value = [
        listed_usage("standardNCADSA100v4Family", used=0, limit=0, kind="lowPriorityCores",
                     label="Standard NCADSA100v4 Family Cluster LowPriority vCPUs"),
        listed_usage("standardNCADSA100v4Family", used=0, limit=24),
        listed_usage("TotalDedicatedCores", used=90, limit=100, kind="totalCores",
                     label="Total Cluster Dedicated Regional vCPUs"),
    ]
    with pytest.raises(SystemExit) as stop:
        setup_ml.main([])
    assert "for cluster 'gpu-nc24s-a100-v4' (1 x Standard_NC24ads_A100_v4): all families in eastus2 needs 24 " \
           "vCPUs, 10 available (90 of 100 in use)" in str(stop.value)
    nothing_created(workspace)


def test_a_reused_clusters_quota_is_checked_for_the_nodes_it_does_not_have_now(workspace):
    # Quota is taken by allocated nodes only: a reused cluster at 0 nodes holds none of it.
    workspace.compute.list_usage.return_value = [listed_usage("standardNCADSA100v4Family", used=24, limit=24)]
    workspace.compute.get.side_effect = None
    workspace.compute.get.return_value = AmlCompute(name="gpu-nc24s-a100-v4", size="Standard_NC24ads_A100_v4",
                                                    location="eastus2", max_instances=1)
    with pytest.raises(SystemExit) as stop:
        setup_ml.main([])
    assert "needs 24 vCPUs, 0 available (24 of 24 in use)" in str(stop.value)
    workspace.jobs.create_or_update.assert_not_called()
    workspace.compute.list_nodes.return_value = [object()]  # its one node, allocated now, is in the 24 in use
    setup_ml.main([])
    workspace.compute.list_nodes.assert_called_with("gpu-nc24s-a100-v4")
    workspace.jobs.create_or_update.assert_called_once()


def test_an_unreadable_quota_list_is_said_in_one_line_and_the_run_goes_on(workspace, capsys):
    workspace.compute.list_usage.side_effect = HttpResponseError(
        message="(AuthorizationFailed) The client has no authorization to perform action "
                "'Microsoft.MachineLearningServices/locations/usages/read'\nCode: AuthorizationFailed")
    setup_ml.main([])
    said = next(line for line in capsys.readouterr().out.splitlines() if "quota list" in line)
    assert "eastus2" in said and "usages/read" in said and "going on" in said
    workspace.jobs.create_or_update.assert_called_once()


def test_the_cluster_goes_to_the_workspaces_region_unless_told_otherwise(workspace, capsys):
    workspace.workspaces.get.return_value = Workspace(name="finetunephi-workspace", location="swedencentral")
    workspace.compute.list_usage.return_value = [listed_usage("standardNCADSA100v4Family", 0, 24, "swedencentral"),
                                                 listed_usage("standardNCADSA100v4Family", 0, 24, "westus3")]
    setup_ml.main([])
    workspace.workspaces.get.assert_called_with("finetunephi-workspace")
    assert created_compute_body(workspace)["location"] == "swedencentral"
    workspace.compute.list_usage.assert_called_with(location="swedencentral")
    workspace.compute.list_sizes.assert_called_with(location="swedencentral")
    assert "warning" not in capsys.readouterr().out

    setup_ml.main(["--location", "westus3"])
    assert created_compute_body(workspace)["location"] == "westus3"
    workspace.compute.list_usage.assert_called_with(location="westus3")
    warning = next(line for line in capsys.readouterr().out.splitlines() if "warning" in line)
    assert "westus3" in warning and "swedencentral" in warning


@pytest.mark.parametrize("argv, timeout, cost", [
    ([], "PT4H", "US$14.68 (4 h x 1 x Standard_NC24ads_A100_v4 at US$3.67/h, East US list price 2026-11)"),
    (["--max-hours", "2.5"], "PT2H30M", "US$9.18 (2.5 h x 1 x Standard_NC24ads_A100_v4"),
    (["--instance-count", "2"], "PT4H", "US$29.36 (4 h x 2 x Standard_NC24ads_A100_v4"),
    (["--cpu"], "PT6H", "US$6.05 (6 h x 1 x Standard_E16s_v3 at US$1.01/h"),
    (["--rehearsal"], "PT1H", "US$0.29 (1 h x 1 x Standard_DS3_v2 at US$0.29/h"),
])
def test_every_job_has_a_time_limit_and_says_what_a_hung_job_can_cost(workspace, capsys, argv, timeout, cost):
    setup_ml.main([*argv, "--no-stream"])
    assert submitted_job_body(workspace)["limits"] == {"jobLimitsType": "Command", "timeout": timeout}
    out = capsys.readouterr().out
    assert "after which Azure cancels the job; the most a job that hangs can cost: " + cost in out


def test_a_reused_cluster_that_keeps_nodes_running_is_warned_about_with_its_cost(workspace, capsys):
    workspace.compute.get.side_effect = None
    workspace.compute.get.return_value = AmlCompute(name="gpu-nc24s-a100-v4", size="Standard_NC24ads_A100_v4",
                                                    location="eastus2", min_instances=1, max_instances=1)
    setup_ml.main(["--no-stream"])
    warning = next(line for line in capsys.readouterr().out.splitlines() if "warning" in line)
    assert "'gpu-nc24s-a100-v4'" in warning and "min_instances=1" in warning and "US$3.67/h" in warning


def registry_layout(tiny_model_dir, folder):
    """The tiny model laid out as the `azureml` registry's Phi-3.5-mini-instruct is (Azure ML's hftransformersv2
    MLflow flavour): MLmodel at the top, weights in data/model, config in data/config, tokenizer in data/tokenizer."""
    (folder / "data").mkdir(parents=True)
    (folder / "MLmodel").write_text("flavors:\n  hftransformersv2:\n    model_data: data\n    task_type: chat-completion\n")
    tokenizer_files = {p.name for p in tiny_model_dir.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "chat_template"))}
    shutil.copytree(tiny_model_dir, folder / "data" / "model", ignore=lambda d, names: tokenizer_files & set(names))
    shutil.copytree(tiny_model_dir, folder / "data" / "tokenizer",
                    ignore=lambda d, names: set(names) - tokenizer_files)
    (folder / "data" / "config").mkdir()
    shutil.copy(tiny_model_dir / "config.json", folder / "data" / "config")
    return folder


def test_the_base_model_from_azures_registry_is_a_read_only_mlflow_input(workspace, capsys):
    setup_ml.main(["--base-model", "registry", "--no-stream"])
    job = submitted_job_body(workspace)
    assert job["inputs"]["model_name"] == {
        "uri": "azureml://registries/azureml/models/Phi-3.5-mini-instruct/versions/6",
        "jobInputType": "mlflow_model", "mode": "ReadOnlyMount",
    }
    assert job["command"].endswith("--save-steps 0 --require_gpu --model-name ${{inputs.model_name}}")
    assert "Base model: azureml://registries/azureml/models/Phi-3.5-mini-instruct/versions/6, mounted read-only" \
        in capsys.readouterr().out
    with pytest.raises(SystemExit):
        setup_ml.parse_args(["--base-model", "registry", "--model-name", "microsoft/Phi-3-mini-4k-instruct"])


def test_the_job_fine_tunes_the_registry_layout_mounted_read_only(workspace, tmp_path, tiny_model_dir, chat_files):
    # The CPU profile's command (no --require_gpu) with the registry's model: what the job runs, with that
    # input laid out as Azure's registry keeps it and mounted read-only.
    setup_ml.main(["--cpu", "--base-model", "registry", "--no-int4", "--no-stream", "--", "--max-steps", "2",
                   "--max-length", "128"])
    body = submitted_job_body(workspace)
    model = registry_layout(tiny_model_dir, tmp_path / "registry-model")
    snapshot, outputs = code_snapshot_and_outputs(tmp_path, ("model_output",))
    args = job_command_here(body, {"inputs.train_file": chat_files[0], "inputs.eval_file": chat_files[1],
                                   "inputs.model_name": model, "outputs.model_output": outputs["model_output"]})
    result = run_in_mounts(args, snapshot, outputs.values(), [model])
    assert result.returncode not in (98, 99), f"the mounts were not made ({result.returncode}): {result.stderr}"
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert (outputs["model_output"] / "MLmodel").is_file()
    assert (outputs["model_output"] / "components" / "tokenizer" / "tokenizer_config.json").is_file()
    assert "test loss" in result.stdout.strip().splitlines()[-1]


def test_a_gpu_that_cannot_compute_stops_the_job_in_one_line(monkeypatch):
    # torch sees a GPU but its first matmul fails (a driver or cuBLAS that does not match torch's): one line.
    import fine_tune

    monkeypatch.setattr(fine_tune.torch.cuda, "is_available", lambda: True)
    with pytest.raises(SystemExit) as stop:
        fine_tune.check_gpu()
    message = str(stop.value)
    assert message.startswith("fine_tune.py: --require_gpu, but a matmul on the GPU failed: ")
    assert f"torch.version.cuda = {fine_tune.torch.version.cuda}" in message and "\n" not in message
    assert message.endswith("check that the image's CUDA libraries are not older than torch's, or drop "
                            "--require_gpu to train on the CPU")
