"""deploy_model.py through the real, unpatched azure-ai-ml MLClient, against Azure's REST API as tests/azure_rest.py
stands in for it: the endpoint and deployment created, failed, interrupted, a name taken, a Failed one re-run."""

import pytest

from azure_rest import GROUP, LOCATION, SUBSCRIPTION, reach_stand_in, usage, wait_for_pollers
from conftest import run_main

import config  # noqa: I001  (the same module object the scripts hold)
import deploy_model

JOB = "olive_plum_0123456789"
ENDPOINT, DEPLOYMENT, MODEL = "finetune-phi-endpoint", "finetune-phi-deployment", "finetune-phi-model"
IDENTITY = (f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{GROUP}/providers/Microsoft.ManagedIdentity/"
            "userAssignedIdentities/finetunephi-uai")


@pytest.fixture
def azure(tmp_path, monkeypatch):
    """The stand-in with a Completed fine-tuning job, reached by deploy_model.py's real MLClient; its settings."""
    stand_in = reach_stand_in(monkeypatch, tmp_path, deploy_model)
    stand_in.add_completed_job(JOB)
    for name, value in (("AZURE_ML_JOB_NAME", JOB), ("AZURE_MODEL_NAME", MODEL), ("AZURE_ENDPOINT_NAME", ENDPOINT),
                        ("AZURE_DEPLOYMENT_NAME", DEPLOYMENT), ("AZURE_MANAGED_IDENTITY_RESOURCE_ID", IDENTITY),
                        ("AZURE_MANAGED_IDENTITY_CLIENT_ID", "11111111-2222-3333-4444-555555555555")):
        monkeypatch.setattr(config, name, value)
    for name in ("AZURE_ML_ENDPOINT", "AZURE_ML_API_KEY"):  # save_settings() sets them (run_main undoes what it
        monkeypatch.setattr(config, name, getattr(config, name))  # exports to the environment)
    yield stand_in
    wait_for_pollers()
    stand_in.close()


def said(result) -> str:
    return result.stdout + result.stderr


def last_line(result) -> str:
    lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
    return lines[-1] if lines else ""


def deployment_route(name=DEPLOYMENT) -> str:
    return f"/onlineEndpoints/{ENDPOINT}/deployments/{name}"


def test_an_endpoint_and_its_deployment_are_created_and_serve(azure, tmp_path):
    result = run_main(deploy_model.main, [], tmp_path)

    assert result.returncode == 0, said(result)[-2000:]
    (model,) = azure.called("PUT", f"/models/{MODEL}-int4/versions/1")
    assert model["body"]["properties"]["modelType"] == "mlflow_model"
    assert model["body"]["properties"]["modelUri"] == f"azureml://jobs/{JOB}/outputs/quantized_model_output"
    create, traffic = azure.called("PUT", f"/onlineEndpoints/{ENDPOINT}")
    assert create["body"]["properties"]["authMode"] == "Key"
    assert list(create["body"]["identity"]["userAssignedIdentities"]) == [IDENTITY]
    (deployment,) = azure.called("PUT", deployment_route())
    body = deployment["body"]
    assert body["properties"]["instanceType"] == "Standard_E4s_v3" and body["sku"]["capacity"] == 1
    assert body["properties"]["model"].endswith(f"/models/{MODEL}-int4/versions/1")
    assert body["properties"]["codeConfiguration"]["scoringScript"] == "score.py"
    assert traffic["body"]["properties"]["traffic"] == {DEPLOYMENT: 100}
    # Each creation was an ARM long-running operation, polled to its end.
    assert len([r for r in azure.requests if "mfeOperationsStatus" in r["path"]]) == 3
    env = (tmp_path / ".env").read_text()
    assert f"https://{ENDPOINT}.{LOCATION}.inference.ml.azure.com/score" in env and "stand-in-primary-key" in env
    (done,) = [line for line in result.stdout.splitlines() if line.startswith("Done.")]
    assert ENDPOINT in done and "US$0.25/h" in done
    assert "python deploy_model.py --delete --yes" in result.stdout


def test_a_failed_deployment_shows_azures_error_its_logs_and_what_still_bills(azure, tmp_path):
    azure.operation_states["deployments"] = ["Failed"]
    result = run_main(deploy_model.main, [], tmp_path)

    assert result.returncode != 0
    assert "Traceback" not in said(result)
    assert "ResourceNotReady" in said(result) and "User container has crashed" in said(result)
    assert "Container crashed at boot" in result.stderr  # the deployment's own logs (getLogs)
    assert f"deployment {DEPLOYMENT}, Failed: US$0.25/h" in said(result)
    assert "python deploy_model.py --delete --yes" in said(result)


def test_ctrl_c_while_the_deployment_is_created_says_what_bills_and_how_to_delete_it(azure, tmp_path):
    # Ctrl-C arrives while the SDK's poller asks how the deployment's creation goes: SIGINT to the main thread,
    # which waits on the poller as deploy_model.py does.
    azure.operation_states["deployments"] = ["InProgress", "Succeeded"]
    azure.ctrl_c_at("deployments status", 1)
    try:
        result = run_main(deploy_model.main, [], tmp_path)
    except KeyboardInterrupt:  # as the learner would see it: a traceback (and the run of the tests goes on)
        pytest.fail("Ctrl-C while deploying ended deploy_model.py with a KeyboardInterrupt traceback")

    assert result.returncode == 130  # as a shell reports a command stopped by Ctrl-C
    assert "Traceback" not in said(result), said(result)[-3000:]
    assert f"deployment {DEPLOYMENT}" in result.stdout and "US$0.25/h" in result.stdout
    assert "python deploy_model.py --delete --yes" in said(result)
    assert not [r for r in azure.requests if r["method"] == "DELETE"]  # nothing is deleted without asking


def test_an_endpoint_name_taken_in_the_region_is_one_line(azure, tmp_path):
    azure.taken_endpoint_names = {ENDPOINT}
    result = run_main(deploy_model.main, [], tmp_path)

    assert result.returncode != 0
    assert "Traceback" not in said(result), said(result)[-3000:]
    line = last_line(result)
    assert ENDPOINT in line and "unique within a region" in line
    assert not azure.called("PUT", deployment_route())


def test_a_failed_deployment_is_deleted_before_it_is_created_again(azure, tmp_path):
    azure.add_endpoint(ENDPOINT, {DEPLOYMENT: "Failed"})
    result = run_main(deploy_model.main, [], tmp_path)

    assert result.returncode == 0, said(result)[-3000:]
    calls = [(r["method"], r["path"].split("?")[0]) for r in azure.requests]
    deleted = calls.index(("DELETE", azure.scope + deployment_route()))
    created = calls.index(("PUT", azure.scope + deployment_route()))
    assert deleted < created
    assert [line for line in said(result).splitlines() if DEPLOYMENT in line and "Failed" in line]
    assert azure.resource(deployment_route())["properties"]["provisioningState"] == "Succeeded"


def test_short_quota_for_the_deployment_stops_before_anything_is_registered(azure, tmp_path):
    azure.usages = [usage("standardESv3Family", used=30, limit=32)]
    result = run_main(deploy_model.main, [], tmp_path)

    assert result.returncode == 1
    assert "needs 8 vCPUs, 2 available (30 of 32 in use)" in result.stderr
    assert not [r for r in azure.requests if r["method"] in ("PUT", "DELETE")]
