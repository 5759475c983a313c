"""An MLClient whose operation groups are autospecs of azure-ai-ml's real classes.

`create_autospec(MLClient)` alone does not check the operation groups (they are properties),
so each group is specced from its property's return annotation: a method that does not exist,
or an argument the real method does not take, fails here as it would against Azure.
"""

import typing
from unittest.mock import create_autospec

from azure.ai.ml import MLClient
from azure.core.polling import LROPoller

GROUPS = ("jobs", "compute", "environments", "models", "online_endpoints", "online_deployments")


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
