"""deploy_model.py against mocked Azure: registration, endpoint, deployment, traffic, keys, teardown."""

import copy
import os
import re
import sys

import pytest
import yaml
from azure.ai.ml import Output
from azure.ai.ml._restclient.arm_ml_service.models import DeploymentProvisioningState
from azure.ai.ml.entities import CommandJob, EndpointAuthKeys, ManagedOnlineDeployment, ManagedOnlineEndpoint, Workspace
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

from azure_fakes import listed_size, listed_usage, mocked_ml_client, poller
from conftest import ROOT, options_without_help, run_script

import config  # noqa: I001  (the same module object the scripts hold)
import deploy_model
from azure_steps import rehearsal
from azure_steps.preflight import ENDPOINT_NAME
from serving.forms import AZURE_MLFLOW_SCORING_IMPORTS, FORMS

IDENTITY = (
    "/subscriptions/00000000-1111-2222-3333-444444444444/resourceGroups/finetunephi-rg/providers/"
    "Microsoft.ManagedIdentity/userAssignedIdentities/finetunephi-managedidentity"
)
SETTINGS = {
    "AZURE_SUBSCRIPTION_ID": "00000000-1111-2222-3333-444444444444",
    "AZURE_RESOURCE_GROUP_NAME": "finetunephi-rg",
    "AZURE_ML_WORKSPACE_NAME": "finetunephi-workspace",
    "AZURE_MANAGED_IDENTITY_CLIENT_ID": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
    "AZURE_MANAGED_IDENTITY_NAME": "finetunephi-managedidentity",
    "AZURE_MANAGED_IDENTITY_RESOURCE_ID": IDENTITY,
    "AZURE_MODEL_NAME": "finetune-phi-model",
    "AZURE_ENDPOINT_NAME": "finetune-phi-endpoint",
    "AZURE_DEPLOYMENT_NAME": "finetune-phi-deployment",
    "AZURE_ML_JOB_NAME": "shy_lamp_42",
    "AZURE_ML_ENDPOINT": "your_fine_tuned_model_endpoint_uri",
    "AZURE_ML_API_KEY": "your_fine_tuned_model_api_key",
}
SCORING_URI = "https://finetune-phi-endpoint.eastus2.inference.ml.azure.com/score"
MODEL_ID = "azureml:/subscriptions/s/resourceGroups/finetunephi-rg/workspaces/w/models/finetune-phi-model/versions/3"


class Live:
    """The endpoint's state as Azure would hold it between calls."""

    def __init__(self, endpoint=None):
        self.endpoint = endpoint
        self.bodies = []  # every endpoint PUT, as its REST body
        self.deployments = {}  # name: deployment, as the service keeps them
        self.deployment_error = None  # set to make the next deployment fail

    def delete(self, name):
        self.endpoint, self.deployments = None, {}
        return poller(None)

    def delete_deployment(self, name, endpoint_name):
        del self.deployments[name]
        return poller(None, polls_before_done=1)

    def put_deployment(self, deployment):
        stored = copy.deepcopy(deployment)
        # A str enum, as a deployment the service returns has it.
        stored._provisioning_state = DeploymentProvisioningState("Failed" if self.deployment_error else "Succeeded")
        self.deployments[deployment.name] = stored
        return poller(error=self.deployment_error) if self.deployment_error else poller(deployment, polls_before_done=3)

    def get_deployment(self, name, endpoint_name):
        if name not in self.deployments:
            raise ResourceNotFoundError(f"deployment {name} not found")
        return copy.deepcopy(self.deployments[name])

    def get(self, name):
        if self.endpoint is None:
            raise ResourceNotFoundError(f"endpoint {name} not found")
        return copy.deepcopy(self.endpoint)

    def put(self, endpoint):
        self.bodies.append(copy.deepcopy(endpoint)._to_rest_online_endpoint(location="eastus2").as_dict())
        self.endpoint = copy.deepcopy(endpoint)
        self.endpoint._scoring_uri = SCORING_URI  # set by the service
        return poller(self.endpoint, polls_before_done=2)


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    for name, value in SETTINGS.items():
        monkeypatch.setattr(config, name, value)
    monkeypatch.setattr(config, "ENV_FILE", tmp_path / ".env")
    client = mocked_ml_client()
    client.jobs.get.return_value = completed_job()
    client.models.create_or_update.side_effect = lambda model: registered(model)
    client.online_endpoints.get_keys.return_value = EndpointAuthKeys(primary_key="pk-123", secondary_key="sk-456")
    live = Live()
    client.online_endpoints.get.side_effect = lambda name: live.get(name)
    client.online_endpoints.begin_create_or_update.side_effect = live.put
    client.online_endpoints.begin_delete.side_effect = lambda name: live.delete(name)
    client.online_deployments.begin_create_or_update.side_effect = live.put_deployment
    client.online_deployments.get.side_effect = live.get_deployment
    client.online_deployments.begin_delete.side_effect = live.delete_deployment
    client.online_deployments.list.side_effect = lambda endpoint_name: list(live.deployments.values())
    client.workspaces.get.return_value = Workspace(name="finetunephi-workspace", location="eastus2")
    client.compute.list_sizes.return_value = [listed_size("Standard_E4s_v3", "standardESv3Family", 4),
                                              listed_size("Standard_DS1_v2", "standardDSv2Family", 1),
                                              listed_size("Standard_DS2_v2", "standardDSv2Family", 2)]
    client.compute.list_usage.return_value = [listed_usage("standardESv3Family", used=0, limit=10),
                                              listed_usage("standardDSv2Family", used=0, limit=10)]
    client.live = live
    monkeypatch.setattr(deploy_model, "get_ml_client", lambda *needed: client)
    yield client
    for name in ("AZURE_ML_ENDPOINT", "AZURE_ML_API_KEY"):  # save_settings() exported them
        os.environ.pop(name, None)


def completed_job(status="Completed", outputs=("model_output", "quantized_model_output")):
    job = CommandJob(command="python fine_tune.py", name="shy_lamp_42",
                     outputs={name: Output(type="mlflow_model") for name in outputs})
    job._status = status
    return job


def registered(model):
    result = copy.deepcopy(model)
    result._id = MODEL_ID  # noqa: the service assigns the id
    return result


def deployment_body(client) -> dict:
    (deployment,), _ = client.online_deployments.begin_create_or_update.call_args
    return deployment._to_rest_object(location="eastus2").as_dict()


def test_deploy_registers_creates_deploys_routes_and_saves_keys(workspace, tmp_path, capsys):
    deploy_model.main([])

    workspace.jobs.get.assert_called_once_with("shy_lamp_42")
    # The int4 form by default: the job's second MLflow model output.
    (model,), _ = workspace.models.create_or_update.call_args
    props = model._to_rest_object().as_dict()["properties"]
    assert (props["modelUri"], props["modelType"]) == (
        "azureml://jobs/shy_lamp_42/outputs/quantized_model_output", "mlflow_model"
    )
    assert props["description"].startswith("The int4 ONNX form of the model fine-tuned by job shy_lamp_42")
    assert model.name == "finetune-phi-model-int4"

    create, traffic = workspace.live.bodies
    assert create["identity"] == {"type": "UserAssigned", "userAssignedIdentities": {IDENTITY: {}}}
    assert create["properties"]["authMode"] == "Key"
    assert create["properties"]["traffic"] == {}
    assert traffic["properties"]["traffic"] == {"finetune-phi-deployment": 100}

    body = deployment_body(workspace)
    assert body["sku"] == {"name": "Default", "capacity": 1}
    props = body["properties"]
    assert props["instanceType"] == "Standard_E4s_v3"
    assert props["model"] == MODEL_ID
    assert props["endpointComputeType"] == "Managed"
    # The int4 form runs the project's scoring script (the local endpoint's) in its pinned CPU environment.
    assert props["codeConfiguration"] == {"codeId": str(ROOT / "serving" / "scoring"), "scoringScript": "score.py"}
    (deployment,), _ = workspace.online_deployments.begin_create_or_update.call_args
    assert deployment.environment.image == "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:20250701.v1"
    assert deployment.environment.conda_file == yaml.safe_load((ROOT / "serving" / "conda.yml").read_text())
    assert props["environmentVariables"] == {
        "SUBSCRIPTION_ID": "00000000-1111-2222-3333-444444444444",
        "RESOURCE_GROUP_NAME": "finetunephi-rg",
        "UAI_CLIENT_ID": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
        "WORKER_COUNT": "1",
        # A thread for each of the 6 requests Azure admits, answered together, and 2 for the probes; the script's
        # own timeout.
        "GUNICORN_CMD_ARGS": "--threads 8",
        "SCORING_TIMEOUT_MS": "180000",
    }
    # int4: ~14 s an answer, so Azure may admit 2 x 3 requests; it loads in seconds.
    assert props["requestSettings"] == {"maxConcurrentRequestsPerInstance": 3, "requestTimeout": "PT3M"}
    probe = {"failureThreshold": 30, "successThreshold": 1, "period": "PT10S", "initialDelay": "PT30S"}
    assert props["livenessProbe"] == probe and props["readinessProbe"] == probe
    (deployment,), _ = workspace.online_deployments.begin_create_or_update.call_args
    assert deployment.endpoint_name == "finetune-phi-endpoint" and deployment.name == "finetune-phi-deployment"

    workspace.online_endpoints.begin_delete.assert_not_called()
    env = (tmp_path / ".env").read_text()
    assert f"AZURE_ML_ENDPOINT={SCORING_URI}\n" in env and "AZURE_ML_API_KEY=pk-123\n" in env
    out = capsys.readouterr().out
    assert "deployment: 00:00 elapsed" in out  # a bar of the time waited, not a line per poll
    quota = next(line for line in out.splitlines() if line.startswith("Quota:"))
    assert "needs 8 standardESv3Family vCPUs in eastus2" in quota  # 2 instances with the reserve, 4 vCPUs each
    done = out[out.index("Done."):]
    assert "US$0.25/h" in done and "US$6.00 a day" in done and "1 deployment(s)" in done
    assert "finetune-phi-deployment" in done and "python deploy_model.py --delete --yes" in done


def test_the_end_counts_every_deployment_the_endpoint_holds(workspace, capsys):
    deploy_model.main([])
    workspace.live.deployments["blue"] = ManagedOnlineDeployment(
        name="blue", endpoint_name="finetune-phi-endpoint", instance_type="Standard_E4s_v3", instance_count=2)
    deploy_model.main([])
    out = capsys.readouterr().out
    done = out[out.rindex("Done."):]
    assert "US$0.75/h" in done and "US$18.00 a day" in done and "2 deployment(s)" in done  # 1 + 2 x Standard_E4s_v3
    assert "deployment blue" in done and "US$0.50/h" in done


def test_form_transformers_deploys_the_model_as_trained(workspace):
    deploy_model.main(["--form", "transformers"])
    (model,), _ = workspace.models.create_or_update.call_args
    props = model._to_rest_object().as_dict()["properties"]
    assert (props["modelUri"], props["description"]) == (
        "azureml://jobs/shy_lamp_42/outputs/model_output", "Model created from run."
    )
    assert model.name == "finetune-phi-model"
    body = deployment_body(workspace)["properties"]
    assert body["model"] == MODEL_ID
    # The tutorial's no-code deployment: Azure's own MLflow scoring and environment, in azmlinfsrv's sync worker.
    assert "codeConfiguration" not in body and "environmentId" not in body
    assert body["environmentVariables"]["WORKER_COUNT"] == "1"
    assert "GUNICORN_CMD_ARGS" not in body["environmentVariables"]
    # bf16: ~70 s an answer on one worker, so one request per instance (Azure admits 2: the second
    # waits ~140 s, within the 180 s limit); 7.6 GB to load, so the probes wait longer.
    assert body["requestSettings"] == {"maxConcurrentRequestsPerInstance": 1, "requestTimeout": "PT3M"}
    probe = {"failureThreshold": 60, "successThreshold": 1, "period": "PT10S", "initialDelay": "PT2M"}
    assert body["livenessProbe"] == probe and body["readinessProbe"] == probe


def test_connect_only_fetches_the_live_endpoints_uri_and_key(workspace, tmp_path, capsys):
    workspace.live.endpoint = ManagedOnlineEndpoint(name="finetune-phi-endpoint")
    workspace.live.endpoint._scoring_uri = SCORING_URI
    (tmp_path / ".env").write_text("AZURE_ML_ENDPOINT=http://127.0.0.1:5001/score\nAZURE_ML_API_KEY=local-key\n")
    deploy_model.main(["--connect"])
    env = (tmp_path / ".env").read_text()
    assert f"AZURE_ML_ENDPOINT={SCORING_URI}\n" in env and "AZURE_ML_API_KEY=pk-123\n" in env
    workspace.online_endpoints.get_keys.assert_called_once_with(name="finetune-phi-endpoint")
    for group in ("jobs", "models", "online_deployments"):
        assert getattr(workspace, group).method_calls == [], f"--connect deploys nothing ({group})"
    workspace.online_endpoints.begin_create_or_update.assert_not_called()


def test_connect_to_a_missing_endpoint_names_the_fix(workspace):
    with pytest.raises(SystemExit) as stop:
        deploy_model.main(["--connect"])
    assert "'finetune-phi-endpoint'" in str(stop.value) and "`python deploy_model.py`" in str(stop.value)


def test_a_job_without_the_int4_output_names_the_way_out(workspace):
    workspace.jobs.get.return_value = completed_job(outputs=("model_output",))
    with pytest.raises(SystemExit) as stop:
        deploy_model.main([])
    message = str(stop.value)
    assert "shy_lamp_42" in message and "'quantized_model_output'" in message and "--form transformers" in message
    workspace.models.create_or_update.assert_not_called()


def test_redeploy_updates_a_live_endpoint_in_place(workspace):
    live = ManagedOnlineEndpoint(name="finetune-phi-endpoint", auth_mode="key")
    live.traffic = {"finetune-phi-deployment": 100}
    workspace.live.endpoint = live

    deploy_model.main([])

    workspace.online_endpoints.begin_delete.assert_not_called()
    update = workspace.live.bodies[0]
    assert update["properties"]["traffic"] == {"finetune-phi-deployment": 100}, "the live deployment keeps serving"
    assert update["identity"]["userAssignedIdentities"] == {IDENTITY: {}}


def test_job_name_flag_beats_the_recorded_one(workspace):
    deploy_model.main(["--job-name", "other_job_7"])
    workspace.jobs.get.assert_called_once_with("other_job_7")
    (model,), _ = workspace.models.create_or_update.call_args
    assert model.path == "azureml://jobs/other_job_7/outputs/quantized_model_output"


def test_no_recorded_job_is_a_clear_error(workspace, monkeypatch):
    monkeypatch.setattr(config, "AZURE_ML_JOB_NAME", "")
    with pytest.raises(SystemExit) as stop:
        deploy_model.main([])
    assert "`python setup_ml.py`" in str(stop.value) and "--job-name" in str(stop.value)
    workspace.models.create_or_update.assert_not_called()


@pytest.mark.parametrize("status", ["Failed", "Running", "Canceled"])
def test_unfinished_or_failed_job_stops_before_registering(workspace, status):
    workspace.jobs.get.return_value = completed_job(status)
    with pytest.raises(SystemExit) as stop:
        deploy_model.main([])
    assert str(stop.value).startswith(f"deploy_model.py: job shy_lamp_42 is {status}, not Completed")
    workspace.models.create_or_update.assert_not_called()
    workspace.online_endpoints.begin_create_or_update.assert_not_called()


def test_unknown_job_is_named(workspace):
    workspace.jobs.get.side_effect = ResourceNotFoundError("nope")
    with pytest.raises(SystemExit) as stop:
        deploy_model.main(["--job-name", "typo_job"])
    assert "'typo_job'" in str(stop.value) and "--job-name" in str(stop.value)


def test_failed_deployment_prints_its_logs_and_exits_non_zero(workspace, tmp_path, capsys):
    workspace.live.deployment_error = HttpResponseError(message="ResourceNotReady: User container has crashed or terminated.")
    workspace.online_deployments.get_logs.return_value = "Traceback ... torch.OutOfMemoryError"
    with pytest.raises(SystemExit) as stop:
        deploy_model.main([])
    assert "finetune-phi-deployment failed" in str(stop.value)
    assert "ResourceNotReady: User container has crashed or terminated." in str(stop.value)
    workspace.online_deployments.get_logs.assert_called_once_with(
        "finetune-phi-deployment", "finetune-phi-endpoint", lines=100
    )
    out, err = capsys.readouterr()
    assert "torch.OutOfMemoryError" in err
    # What is left billing, its price, and the one command that removes it.
    still = out[out.index("Still in the workspace"):]
    assert "deployment finetune-phi-deployment, Failed: US$0.25/h" in still
    assert "Remove it: python deploy_model.py --delete --yes" in still
    workspace.online_deployments.list.assert_called_with("finetune-phi-endpoint")
    assert len(workspace.live.bodies) == 1, "no traffic is routed to a failed deployment"
    assert not (tmp_path / ".env").exists()


def test_a_failed_deployment_is_deleted_before_it_is_created_again(workspace, capsys):
    workspace.live.deployment_error = HttpResponseError(message="ResourceNotReady: User container has crashed")
    with pytest.raises(SystemExit):
        deploy_model.main([])
    workspace.live.deployment_error = None
    # Its vCPUs are not counted as held: the pre-flight asks for the deployment's full 8.
    workspace.compute.list_usage.return_value = [listed_usage("standardESv3Family", used=4, limit=10)]
    with pytest.raises(SystemExit) as stop:
        deploy_model.main([])
    assert "needs 8 vCPUs, 6 available" in str(stop.value)
    workspace.online_deployments.begin_delete.assert_not_called()
    workspace.compute.list_usage.return_value = [listed_usage("standardESv3Family", used=0, limit=10)]
    capsys.readouterr()
    deploy_model.main([])
    workspace.online_deployments.begin_delete.assert_called_once_with("finetune-phi-deployment", "finetune-phi-endpoint")
    assert workspace.live.deployments["finetune-phi-deployment"].provisioning_state == "Succeeded"
    out = capsys.readouterr().out
    assert "finetune-phi-deployment is Failed" in out and "deleting it" in out
    assert out.index("deleting it") < out.index("Deploying finetune-phi-deployment")


def test_ctrl_c_while_deploying_says_what_still_bills_and_how_to_delete_it(workspace, capsys):
    workspace.online_deployments.begin_create_or_update.side_effect = lambda deployment: (
        workspace.live.put_deployment(deployment), poller(error=KeyboardInterrupt()))[1]
    with pytest.raises(SystemExit) as stop:
        deploy_model.main([])
    assert stop.value.code == 130
    out = capsys.readouterr().out
    still = out[out.index("Still in the workspace"):]
    assert "deployment finetune-phi-deployment" in still and "US$0.25/h" in still
    assert "Remove it: python deploy_model.py --delete --yes" in still


def test_a_taken_endpoint_name_is_one_line_with_the_fix_and_what_bills(workspace, capsys):
    taken = HttpResponseError(message="Conflict: an endpoint named finetune-phi-endpoint already exists in eastus2")
    workspace.online_endpoints.begin_create_or_update.side_effect = lambda endpoint: poller(error=taken)
    with pytest.raises(SystemExit) as stop:
        deploy_model.main([])
    message = str(stop.value)
    assert "finetune-phi-endpoint" in message and "already exists in eastus2" in message
    assert "AZURE_ENDPOINT_NAME" in message and "\n" not in message
    workspace.online_deployments.begin_create_or_update.assert_not_called()
    assert "Remove it: python deploy_model.py --delete --yes" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["finetune-phi-endpoint-for-my-team-2026", "finetune--phi", "2phi", "ph"])
def test_invalid_endpoint_name_is_caught_before_azure(workspace, monkeypatch, name):
    # Azure's rule (how-to-manage-quotas): begin with a letter, 3-32 characters, letters and numbers,
    # single dashes accepted.
    monkeypatch.setattr(config, "AZURE_ENDPOINT_NAME", name)
    with pytest.raises(SystemExit) as stop:
        deploy_model.main([])
    assert f"AZURE_ENDPOINT_NAME '{name}'" in str(stop.value) and "3-32" in str(stop.value)
    workspace.jobs.get.assert_not_called()


def test_the_rehearsal_deploys_its_tiny_model_on_the_smallest_size_and_asks_the_flow(workspace, monkeypatch,
                                                                                     tmp_path, capsys):
    monkeypatch.setattr(config, "AZURE_ML_REHEARSAL_JOB_NAME", "calm_kiwi_7")
    asked = []
    monkeypatch.setattr("chat.ask_flow.ask_the_flow", lambda question, settings: asked.append((question, settings))
                        or "Microsoft was founded by Bill Gates and Paul Allen in 1975.")
    deploy_model.main(["--rehearsal"])

    workspace.jobs.get.assert_called_once_with("calm_kiwi_7")
    (model,), _ = workspace.models.create_or_update.call_args
    assert model.name == "finetune-phi-model-rehearsal-int4"
    assert model._to_rest_object().as_dict()["properties"]["modelUri"] == (
        "azureml://jobs/calm_kiwi_7/outputs/quantized_model_output"
    )
    create, traffic = workspace.live.bodies
    assert traffic["properties"]["traffic"] == {"rehearsal": 100}
    (deployment,), _ = workspace.online_deployments.begin_create_or_update.call_args
    assert deployment.endpoint_name == "finetune-phi-endpoint-rehearsal" and deployment.name == "rehearsal"
    props = deployment_body(workspace)["properties"]
    assert props["instanceType"] == "Standard_DS1_v2"
    assert props["codeConfiguration"] == {"codeId": str(ROOT / "serving" / "scoring"), "scoringScript": "score.py"}
    # One question through the flow, at the rehearsal's endpoint; .env keeps what it had.
    assert asked == [("Who founded Microsoft?", {"AZURE_ML_ENDPOINT": SCORING_URI, "AZURE_ML_API_KEY": "pk-123"})]
    assert not (tmp_path / ".env").exists()
    # Answered, so its endpoint is deleted at once: nothing is left billing.
    workspace.online_endpoints.begin_delete.assert_called_once_with(name="finetune-phi-endpoint-rehearsal")
    assert workspace.live.endpoint is None
    assert "Deleted endpoint finetune-phi-endpoint-rehearsal." in capsys.readouterr().out

    deploy_model.main(["--rehearsal", "--instance-type", "Standard_DS2_v2", "--keep"])  # the next size up, kept
    assert deployment_body(workspace)["properties"]["instanceType"] == "Standard_DS2_v2"
    workspace.online_endpoints.begin_delete.assert_called_once()  # not again
    out = capsys.readouterr().out
    still = out[out.index("--keep: endpoint finetune-phi-endpoint-rehearsal stays up"):]
    assert "deployment rehearsal" in still and "US$0.15/h" in still
    assert "python deploy_model.py --rehearsal --delete --yes" in still

    deploy_model.main(["--rehearsal", "--delete", "--yes"])
    assert workspace.online_endpoints.begin_delete.call_count == 2 and workspace.live.endpoint is None


def test_rehearsal_endpoint_names_keep_azures_rule():
    assert rehearsal.endpoint_name("finetune-phi-endpoint") == "finetune-phi-endpoint-rehearsal"
    long = rehearsal.endpoint_name("a-very-long-endpoint-name-of-32c")
    assert len(long) <= 32 and ENDPOINT_NAME.fullmatch(long), long
    assert rehearsal.endpoint_name("abcdefghijklmnopqrstu-x") == "abcdefghijklmnopqrstu-rehearsal"


def test_delete_with_yes_removes_the_endpoint(workspace, capsys):
    workspace.live.endpoint = ManagedOnlineEndpoint(name="finetune-phi-endpoint")
    workspace.online_endpoints.begin_delete.return_value = poller(None)
    deploy_model.main(["--delete", "--yes"])
    workspace.online_endpoints.begin_delete.assert_called_once_with(name="finetune-phi-endpoint")
    assert "Deleted endpoint finetune-phi-endpoint." in capsys.readouterr().out


def test_delete_needs_confirmation_without_a_terminal(workspace, monkeypatch):
    monkeypatch.setattr("sys.stdin", open(os.devnull))
    with pytest.raises(SystemExit) as stop:
        deploy_model.main(["--delete"])
    assert "--delete needs --yes" in str(stop.value)
    workspace.online_endpoints.begin_delete.assert_not_called()


def test_delete_of_a_missing_endpoint_is_a_no_op(workspace, capsys):
    deploy_model.main(["--delete", "--yes"])
    workspace.online_endpoints.begin_delete.assert_not_called()
    assert "does not exist; nothing to delete" in capsys.readouterr().out


def test_unfilled_placeholder_stops_the_script(tmp_path):
    result = run_script([ROOT / "deploy_model.py", "--job-name", "j"], cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "config: AZURE_SUBSCRIPTION_ID is still the placeholder 'your_subscription_id'; "
        "set it in .env (copy .env.example) or export AZURE_SUBSCRIPTION_ID=..."
    ]


def test_deploy_needs_identity_and_names_filled(monkeypatch):
    from azure_steps import client as ml_client

    for name, value in SETTINGS.items():
        monkeypatch.setattr(config, name, value)
    monkeypatch.setattr(config, "AZURE_DEPLOYMENT_NAME", "your_fine_tuned_model_deployment_name")
    monkeypatch.setattr(ml_client, "AzureCliCredential", lambda: pytest.fail("no Azure call before settings"))
    monkeypatch.setattr(deploy_model, "get_ml_client", ml_client.get_ml_client)
    with pytest.raises(SystemExit) as stop:
        deploy_model.main([])
    assert str(stop.value).startswith("config: AZURE_DEPLOYMENT_NAME is still the placeholder")


def test_help_explains_every_flag():
    result = run_script([ROOT / "deploy_model.py", "--help"], cwd=ROOT)
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr
    assert options_without_help(deploy_model.parse_args) == []


def nothing_registered_or_created(client):
    client.models.create_or_update.assert_not_called()
    client.online_endpoints.begin_create_or_update.assert_not_called()
    client.online_deployments.begin_create_or_update.assert_not_called()


@pytest.mark.parametrize("argv, family, needed, used", [
    ([], "standardESv3Family", 8, 3),  # one E4s_v3 takes 8: 2 instances with the reserve, 4 vCPUs each
    (["--rehearsal"], "standardDSv2Family", 2, 9),  # one DS1_v2: 2 instances x 1 vCPU
])
def test_short_quota_stops_the_deployment_before_anything_is_registered(workspace, monkeypatch, argv, family,
                                                                        needed, used):
    monkeypatch.setattr(config, "AZURE_ML_REHEARSAL_JOB_NAME", "calm_kiwi_7")
    workspace.compute.list_usage.return_value = [listed_usage(family, used=used, limit=10)]
    with pytest.raises(SystemExit) as stop:
        deploy_model.main(argv)
    name = "rehearsal" if argv else "finetune-phi-deployment"
    size = "Standard_DS1_v2" if argv else "Standard_E4s_v3"
    message = str(stop.value)
    assert f"deployment {name}" in message and family in message and "eastus2" in message
    assert f"needs {needed} vCPUs, {10 - used} available ({used} of 10 in use)" in message
    assert "https://ml.azure.com/quota" in message
    workspace.compute.list_usage.assert_called_once_with(location="eastus2")
    nothing_registered_or_created(workspace)


def test_an_update_in_place_needs_no_more_quota_than_the_deployment_holds(workspace):
    deploy_model.main([])  # the first deployment takes 8 of the 10
    workspace.compute.list_usage.return_value = [listed_usage("standardESv3Family", used=8, limit=10),
                                                 listed_usage("standardDSv2Family", used=8, limit=10)]
    deploy_model.main([])  # an update of the same size: no more
    assert workspace.online_deployments.begin_create_or_update.call_count == 2
    with pytest.raises(SystemExit) as stop:  # another size needs its own
        deploy_model.main(["--instance-type", "Standard_DS2_v2"])
    assert ": standardDSv2Family in eastus2 needs 4 vCPUs, 2 available (8 of 10 in use)" in str(stop.value)
    assert workspace.online_deployments.begin_create_or_update.call_count == 2


def test_a_rehearsal_whose_question_fails_keeps_its_endpoint_and_says_what_it_costs(workspace, monkeypatch, capsys):
    monkeypatch.setattr(config, "AZURE_ML_REHEARSAL_JOB_NAME", "calm_kiwi_7")

    def failing_flow(question, settings):
        sys.exit("local pipeline: the flow failed: HTTP 424 from the endpoint")

    monkeypatch.setattr("chat.ask_flow.ask_the_flow", failing_flow)
    with pytest.raises(SystemExit) as stop:
        deploy_model.main(["--rehearsal"])
    assert str(stop.value) == "local pipeline: the flow failed: HTTP 424 from the endpoint"
    workspace.online_endpoints.begin_delete.assert_not_called()  # kept, to read its logs
    out = capsys.readouterr().out
    still = out[out.index("Still in the workspace"):]
    assert "endpoint finetune-phi-endpoint-rehearsal, deployment rehearsal" in still and "US$0.07/h" in still
    assert "python deploy_model.py --rehearsal --delete --yes" in still


def test_the_transformers_model_requires_what_azures_scoring_script_imports(fine_tuned_model):
    """Azure serves the transformers form with its own generated MLflow scoring script, which imports
    azureml.ai.monitoring since May 2026 (Azure/azureml-examples PRs #3904, #3923, #4008, #4022, #4031):
    the registered model's requirements are what Azure installs, so they must hold it."""
    required = {re.split(r"[=<>~!]", line)[0].strip().lower()
                for line in (fine_tuned_model / "requirements.txt").read_text().splitlines() if line.strip()}
    assert FORMS["transformers"].batched is False  # served by Azure's script, not the project's
    for module, package in AZURE_MLFLOW_SCORING_IMPORTS.items():
        assert package in required, f"{module} is imported by Azure's scoring script; {package} is not required"


@pytest.mark.parametrize("sizes", ["unlisted", "forbidden"])
def test_a_deployment_size_the_cluster_list_lacks_leaves_its_quota_unchecked_and_goes_on(workspace, capsys, sizes):
    # Managed endpoints keep a size list of their own: a size missing from the clusters' list is not proof.
    if sizes == "forbidden":
        workspace.compute.list_sizes.side_effect = HttpResponseError(message="(AuthorizationFailed) vmSizes/read")
    deploy_model.main(["--instance-type", "Standard_F4s_v2"])
    assert deployment_body(workspace)["properties"]["instanceType"] == "Standard_F4s_v2"
    said = next(line for line in capsys.readouterr().out.splitlines() if "cannot be checked" in line)
    assert "Standard_F4s_v2" in said and "going on" in said
