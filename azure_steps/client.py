"""Connect setup_ml.py and deploy_model.py to the Azure ML workspace named in config.py, and wait on it.

As in the tutorial, the credential is the Azure CLI's login (`az login`). Unlike the tutorial,
unfilled settings and a missing login each stop the script with one line before any Azure call.
"""

import sys

from azure.ai.ml import MLClient
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError
from azure.identity import AzureCliCredential, CredentialUnavailableError
from tqdm import tqdm

import config

# Azure ML's supported Ubuntu 22.04 CPU image at its newest dated tag (AzureML-Containers' release notes
# for openmpi4.1.0-ubuntu22.04); the ubuntu20.04 one the tutorial used is deprecated.
OPENMPI_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-ubuntu22.04:20250701.v1"
WORKSPACE_SETTINGS = ("AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP_NAME", "AZURE_ML_WORKSPACE_NAME")
MANAGEMENT_SCOPE = "https://management.azure.com/.default"


def check_login(credential) -> None:
    """Ask the Azure CLI for a token now, so a missing login is one clear line, not a traceback later."""
    try:
        credential.get_token(MANAGEMENT_SCOPE)
    except (CredentialUnavailableError, ClientAuthenticationError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.exit(
            f"Azure CLI login needed ({reason}); run `az login` (or `az login --use-device-code`) "
            "and select the subscription in AZURE_SUBSCRIPTION_ID"
        )


def get_ml_client(*needed_settings: str) -> MLClient:
    """
    Initialize the ML Client using Azure CLI credentials.
    """
    config.require(*WORKSPACE_SETTINGS, *needed_settings)
    credential = AzureCliCredential()
    check_login(credential)
    return MLClient(
        credential, config.AZURE_SUBSCRIPTION_ID, config.AZURE_RESOURCE_GROUP_NAME, config.AZURE_ML_WORKSPACE_NAME
    )


def wait(poller, what: str, poll_s: float = 10):
    """Wait for a long-running Azure operation (create, update, delete) behind a progress bar of its time.

    Ctrl-C stops only the waiting: the operation goes on in Azure.
    """
    with tqdm(desc=what, bar_format="{desc}: {elapsed} elapsed", file=sys.stdout, mininterval=poll_s) as bar:
        while not poller.done():
            poller.wait(timeout=poll_s)
            bar.update()
    return poller.result()


def state_text(state) -> str:
    """A state as Azure writes it ("Canceled"): azure-ai-ml hands some as str enums, which format as their names."""
    return str(getattr(state, "value", state) or "")


def azure_reason(error: HttpResponseError) -> str:
    """Azure's error code and the first line of its message."""
    code = getattr(getattr(error, "error", None), "code", None)
    lines = (getattr(getattr(error, "error", None), "message", None) or str(error)).strip().splitlines()
    return ": ".join(part for part in (code, lines[0] if lines else type(error).__name__) if part)
