"""azure_steps/billing.py against mocked Azure lists: what bills now, each with its price an hour."""

import pytest
from azure.ai.ml.entities import (
    AmlCompute,
    AmlComputeNodeInfo,
    ComputeInstance,
    ManagedOnlineDeployment,
    ManagedOnlineEndpoint,
)
from azure.core.exceptions import HttpResponseError

from azure_fakes import mocked_ml_client
from conftest import options_without_help

from azure_steps import billing


def deployment(name, endpoint, size, count, state="Succeeded"):
    return ManagedOnlineDeployment(name=name, endpoint_name=endpoint, instance_type=size, instance_count=count,
                                   provisioning_state=state)


@pytest.fixture
def workspace(monkeypatch):
    client = mocked_ml_client()
    client.online_endpoints.list.return_value = [ManagedOnlineEndpoint(name="finetune-phi-endpoint"),
                                                 ManagedOnlineEndpoint(name="finetune-phi-endpoint-rehearsal"),
                                                 ManagedOnlineEndpoint(name="empty-endpoint")]
    deployments = {
        "finetune-phi-endpoint": [deployment("blue", "finetune-phi-endpoint", "Standard_E4s_v3", 1),
                                  deployment("green", "finetune-phi-endpoint", "Standard_E4s_v3", 2, "Failed")],
        "finetune-phi-endpoint-rehearsal": [deployment("rehearsal", "x", "Standard_DS1_v2", 1)],
        "empty-endpoint": [],
    }
    client.online_deployments.list.side_effect = lambda endpoint_name: deployments[endpoint_name]
    client.compute.list.return_value = [
        AmlCompute(name="gpu-nc24s-a100-v4", size="Standard_NC24ads_A100_v4", min_instances=0, max_instances=1),
        AmlCompute(name="cpu-rehearsal", size="Standard_DS3_v2", min_instances=1, max_instances=1),
        AmlCompute(name="odd-cluster", size="Standard_Q9_v1", min_instances=0, max_instances=2),
        ComputeInstance(name="my-notebook", size="Standard_DS3_v2", state="Running"),
        ComputeInstance(name="stopped-notebook", size="Standard_E16s_v3", state="Stopped"),
        ComputeInstance(name="starting-notebook", size="Standard_DS3_v2", state="Starting"),
        ComputeInstance(name="busy-notebook", size="Standard_E16s_v3", state="JobRunning"),
    ]
    nodes = {"gpu-nc24s-a100-v4": 1, "cpu-rehearsal": 1, "odd-cluster": 2}
    client.compute.list_nodes.side_effect = lambda name: [AmlComputeNodeInfo() for _ in range(nodes[name])]
    monkeypatch.setattr(billing, "get_ml_client", lambda *needed: client)
    return client


def row(lines, name):
    return next(line for line in lines if name in line)


def test_lists_what_bills_now_with_its_price_an_hour(workspace, capsys):
    billing.main([])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "What bills in the workspace now:"
    assert "blue, Succeeded" in row(lines, "deployment blue") and "US$0.25/h" in row(lines, "deployment blue")
    assert "green, Failed" in row(lines, "deployment green") and "US$0.50/h" in row(lines, "deployment green")
    assert "US$0.07/h" in row(lines, "deployment rehearsal")
    assert "bills nothing" in row(lines, "empty-endpoint")
    assert "1 node(s) now" in row(lines, "cluster gpu-nc24s") and "US$3.67/h" in row(lines, "cluster gpu-nc24s")
    assert "min_instances=1" in row(lines, "cluster cpu-rehearsal") and "US$0.29/h" in row(lines, "cluster cpu-rehearsal")
    assert "Standard_Q9_v1 not in" in row(lines, "cluster odd-cluster")
    assert "US$0.29/h" in row(lines, "my-notebook")
    # 0.25 + 0.50 + 0.07 + 3.67 + 0.29 + 0.29 (+ 0.29 and 1.008 for the starting and job-running instances)
    total = row(lines, "Now:")
    assert "US$6.37/h plus the sizes whose price is not in the table" in total and "US$152.83 a day" in total
    # The registry, by tier: Basic from the first environment build, Standard from Azure's quickstart template.
    assert "US$0.167/day if Basic" in total and "US$0.667/day if Standard" in total
    assert lines[-1].startswith("Undo: python deploy_model.py --delete --yes")


@pytest.mark.parametrize("state", ["Creating", "Starting", "Running", "JobRunning", "SettingUp", "UserSettingUp",
                                   "Restarting", "Resizing", "Stopping", "SetupFailed", "UserSetupFailed",
                                   "Unusable", "Unknown", "Deleting"])
def test_every_compute_instance_state_that_holds_a_vm_bills(workspace, state):
    from azure.ai.ml._restclient.arm_ml_service.models import ComputeInstanceState

    state = ComputeInstanceState(state)  # a str enum, as a listed instance has it
    workspace.compute.list.return_value = [ComputeInstance(name="notebook", size="Standard_DS3_v2", state=state)]
    (text, price), = billing.cluster_rows(workspace)
    assert f"notebook, {state.value}:" in text and price == pytest.approx(0.29)


@pytest.mark.parametrize("state", ["Stopped", "CreateFailed"])
def test_a_stopped_or_never_created_compute_instance_bills_no_vm(workspace, state):
    from azure.ai.ml._restclient.arm_ml_service.models import ComputeInstanceState

    workspace.compute.list.return_value = [ComputeInstance(name="notebook", size="Standard_DS3_v2",
                                                           state=ComputeInstanceState(state))]
    assert billing.cluster_rows(workspace) == []


def test_an_empty_workspace_says_nothing_bills(workspace, capsys):
    workspace.online_endpoints.list.return_value = []
    workspace.compute.list.return_value = []
    assert billing.main([]) == []
    out = capsys.readouterr().out
    assert out.startswith("Nothing in the workspace bills by the hour now.\nNow: US$0.00/h (US$0.00 a day)")


def test_a_refused_list_is_one_line(workspace):
    workspace.online_endpoints.list.side_effect = HttpResponseError(message="(AuthorizationFailed) no read access\nmore")
    with pytest.raises(SystemExit) as stop:
        billing.main([])
    assert "(AuthorizationFailed) no read access" in str(stop.value) and "\n" not in str(stop.value)


def test_help_explains_every_flag(monkeypatch, capsys):
    monkeypatch.setattr(billing, "get_ml_client", lambda *needed: pytest.fail("--help asks Azure nothing"))
    with pytest.raises(SystemExit) as done:
        billing.main(["--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage: ")
    assert options_without_help(billing.parse_args) == []
