"""`python -m azure_steps.billing` through the real, unpatched azure-ai-ml MLClient, against Azure's REST API as
tests/azure_rest.py stands in for it: what bills in the workspace, each with its price an hour."""

import pytest

from azure_rest import reach_stand_in, wait_for_pollers
from conftest import run_main

from azure_steps import billing


@pytest.fixture
def azure(tmp_path, monkeypatch):
    stand_in = reach_stand_in(monkeypatch, tmp_path, billing)
    yield stand_in
    wait_for_pollers()
    stand_in.close()


def test_what_bills_is_listed_with_its_state_and_price(azure, tmp_path):
    azure.add_endpoint("finetune-phi-endpoint", {"finetune-phi-deployment": "Succeeded"})
    azure.add_cluster("gpu-nc24s-a100-v4", "Standard_NC24ads_A100_v4", nodes=1)
    azure.add_cluster("cpu-rehearsal", "Standard_DS3_v2", nodes=0)
    azure.add_compute_instance("learner-ci", "Standard_DS3_v2", "JobRunning")  # a VM up, running a job
    azure.add_compute_instance("stopped-ci", "Standard_DS3_v2", "Stopped")
    result = run_main(billing.main, [], tmp_path)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    (endpoint,) = [line for line in lines if "deployment finetune-phi-deployment" in line]
    assert "endpoint finetune-phi-endpoint, deployment finetune-phi-deployment, Succeeded: US$0.25/h" in endpoint
    (cluster,) = [line for line in lines if "cluster gpu-nc24s-a100-v4" in line]
    assert "1 node(s) now" in cluster and "US$3.67/h" in cluster
    (instance,) = [line for line in lines if "compute instance learner-ci" in line]
    assert "JobRunning" in instance and "Standard_DS3_v2" in instance
    assert not [line for line in lines if "stopped-ci" in line]  # a stopped instance bills no VM
    assert [r for r in azure.requests if r["path"].split("?")[0].endswith("/computes/gpu-nc24s-a100-v4/listNodes")]
