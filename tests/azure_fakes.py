"""An MLClient whose operation groups are autospecs of azure-ai-ml's real classes.

`create_autospec(MLClient)` alone does not check the operation groups (they are properties),
so each group is specced from its property's return annotation: a method that does not exist,
or an argument the real method does not take, fails here as it would against Azure.
"""

import typing
from unittest.mock import create_autospec

from azure.ai.ml import MLClient
from azure.core.polling import LROPoller

GROUPS = ("jobs", "compute", "environments", "models", "online_endpoints", "online_deployments", "workspaces")


def operation_class(group: str) -> type:
    return typing.get_type_hints(getattr(MLClient, group).fget)["return"]


def mocked_ml_client():
    client = create_autospec(MLClient, instance=True)
    for group in GROUPS:
        setattr(client, group, create_autospec(operation_class(group), instance=True))
    return client


def poller(result=None, polls_before_done=0, error=None):
    """An LROPoller that is done after `polls_before_done` checks and returns `result` (or raises `error`)."""
    fake = create_autospec(LROPoller, instance=True)
    fake.done.side_effect = [False] * polls_before_done + [True] * 100
    if error is not None:
        fake.result.side_effect = error
    else:
        fake.result.return_value = result
    return fake


def listed_size(name: str, family: str, vcpus: int, gpus: int = 0):
    """A VmSize as `compute.list_sizes` returns it: built from the service's REST object."""
    from azure.ai.ml._restclient.arm_ml_service.models import VirtualMachineSize
    from azure.ai.ml.entities import VmSize

    return VmSize._from_rest_object(VirtualMachineSize({"name": name, "family": family, "vCPUs": vcpus, "gpus": gpus}))


def listed_usage(family: str, used: int, limit: int, location: str = "eastus2", workspace: str | None = None,
                 kind: str = "vmFamily", label: str | None = None):
    """A Usage as `compute.list_usage` returns it: the subscription's entry of a VM family in a region
    (the shape of azure-rest-api-specs' Usage/list.json example), or, with `workspace`, that workspace's
    share of it; `kind` and `label` make the other entries (totalCores, lowPriorityCores)."""
    from azure.ai.ml._restclient.arm_ml_service.models import Usage as RestUsage
    from azure.ai.ml.entities import Usage

    scope = "/subscriptions/00000000-1111-2222-3333-444444444444/providers/Microsoft.MachineLearningServices"
    if workspace:
        scope = ("/subscriptions/00000000-1111-2222-3333-444444444444/resourceGroups/finetunephi-rg/providers/"
                 f"Microsoft.MachineLearningServices/workspaces/{workspace}")
    kind = "workspaces" if workspace else kind
    return Usage._from_rest_object(RestUsage({
        "id": f"{scope}/locations/{location}/usages/{family}",
        "amlWorkspaceLocation": location if workspace else None,
        "type": f"Microsoft.MachineLearningServices/{kind}/usages",
        "unit": "Count", "currentValue": used, "limit": limit,
        "name": {"value": family, "localizedValue": label or f"{family} Cluster Dedicated vCPUs"},
    }))
