"""billing.py against mocked Azure lists: what bills now, each with its price an hour."""

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
    ]
    nodes = {"gpu-nc24s-a100-v4": 1, "cpu-rehearsal": 1, "odd-cluster": 2}
    client.compute.list_nodes.side_effect = lambda name: [AmlComputeNodeInfo() for _ in range(nodes[name])]
    monkeypatch.setattr(billing, "get_ml_client", lambda *needed: client)
    return client


def test_lists_what_bills_now_with_its_price_an_hour(workspace, capsys):
    billing.main([])
    lines = capsys.readouterr().out.splitlines()
    assert lines[:9] == [
        "What bills in the workspace now:",
        "  endpoint finetune-phi-endpoint, deployment blue, Succeeded: US$0.25/h (1 x Standard_E4s_v3, East US list price 2026-11)",
        "  endpoint finetune-phi-endpoint, deployment green, Failed: US$0.50/h (2 x Standard_E4s_v3, East US list price 2026-11)",
        "  endpoint finetune-phi-endpoint-rehearsal, deployment rehearsal, Succeeded: US$0.07/h (1 x Standard_DS1_v2, East US list price 2026-11)",
        "  endpoint empty-endpoint: no deployment (an endpoint alone bills nothing)",
        "  cluster gpu-nc24s-a100-v4: 1 node(s) now: US$3.67/h (1 x Standard_NC24ads_A100_v4, East US list price 2026-11)",
        "  cluster cpu-rehearsal: 1 node(s) now; min_instances=1 keeps them while idle: US$0.29/h (1 x Standard_DS3_v2, East US list price 2026-11)",
        "  cluster odd-cluster: 2 node(s) now: price of Standard_Q9_v1 not in this collection's table; see https://azure.microsoft.com/pricing/calculator/",
        "  compute instance my-notebook, running: US$0.29/h (1 x Standard_DS3_v2, East US list price 2026-11)",
    ]
    # 0.25 + 0.50 + 0.07 + 3.67 + 0.29 + 0.29 = 5.07 an hour
    assert lines[9] == ("Now: US$5.07/h plus the sizes whose price is not in the table (US$121.68 a day), East US "
                        "list prices 2026-11; storage and the container registry come on top (docs/azure-runtime.md)")
    assert "stopped-notebook" not in "\n".join(lines)
    assert lines[10].startswith("Undo: python deploy_model.py --delete --yes")


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
    assert str(stop.value) == ("billing.py: could not list the workspace's endpoints and computes "
                               "((AuthorizationFailed) no read access)")


def test_help_explains_every_flag(monkeypatch, capsys):
    monkeypatch.setattr(billing, "get_ml_client", lambda *needed: pytest.fail("--help asks Azure nothing"))
    with pytest.raises(SystemExit) as done:
        billing.main(["--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage: ")
    assert options_without_help(billing.parse_args) == []
