"""The one place every script of the collection reads its settings from.

The names and placeholder defaults are the tutorial's. Unlike the tutorial, nothing is typed
into this file: each setting is read from the environment variable of the same name, or from
the untracked `.env` file next to this file (copy `.env.example`), the environment winning.
A script calls `require(...)` with the settings it needs; one still holding its `your_...`
placeholder stops that script with a one-line message saying how to set it.
"""

import os
import re
import sys
from pathlib import Path

from dotenv import dotenv_values, set_key

ROOT = Path(__file__).resolve().parent  # the project's folder, for every script that names a file in it
ENV_FILE = Path(os.environ.get("FINETUNE_PHI_ENV_FILE", ROOT / ".env"))


def _read_env_file() -> dict:
    return dotenv_values(ENV_FILE) if ENV_FILE.is_file() else {}


# Read, not exported: .env's values, read here or written by save_settings(), never reach the environment of
# the processes a script starts; those read .env themselves.
_ENV_FILE_VALUES = _read_env_file()


def _setting(name: str, default: str) -> str:
    # The environment wins over .env, so a one-off `VAR=... python script.py` always takes effect.
    return os.environ.get(name) or _ENV_FILE_VALUES.get(name) or default


# Azure settings
AZURE_SUBSCRIPTION_ID = _setting("AZURE_SUBSCRIPTION_ID", "your_subscription_id")
AZURE_RESOURCE_GROUP_NAME = _setting("AZURE_RESOURCE_GROUP_NAME", "your_resource_group_name")  # "TestGroup"

# Azure Machine Learning settings
AZURE_ML_WORKSPACE_NAME = _setting("AZURE_ML_WORKSPACE_NAME", "your_workspace_name")  # "finetunephi-workspace"

# Azure Managed Identity settings
AZURE_MANAGED_IDENTITY_CLIENT_ID = _setting(
    "AZURE_MANAGED_IDENTITY_CLIENT_ID", "your_azure_managed_identity_client_id"
)
AZURE_MANAGED_IDENTITY_NAME = _setting(
    "AZURE_MANAGED_IDENTITY_NAME", "your_azure_managed_identity_name"
)  # "finetunephi-mangedidentity"
AZURE_MANAGED_IDENTITY_RESOURCE_ID = _setting(
    "AZURE_MANAGED_IDENTITY_RESOURCE_ID",
    f"/subscriptions/{AZURE_SUBSCRIPTION_ID}/resourceGroups/{AZURE_RESOURCE_GROUP_NAME}"
    f"/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{AZURE_MANAGED_IDENTITY_NAME}",
)

# Dataset file paths (relative paths are relative to the folder a script is run from)
TRAIN_DATA_PATH = _setting("TRAIN_DATA_PATH", "data/train_data.jsonl")
TEST_DATA_PATH = _setting("TEST_DATA_PATH", "data/test_data.jsonl")

# Fine-tuned model settings
AZURE_MODEL_NAME = _setting("AZURE_MODEL_NAME", "your_fine_tuned_model_name")  # "finetune-phi-model"
AZURE_ENDPOINT_NAME = _setting(
    "AZURE_ENDPOINT_NAME", "your_fine_tuned_model_endpoint_name"
)  # "finetune-phi-endpoint"
AZURE_DEPLOYMENT_NAME = _setting(
    "AZURE_DEPLOYMENT_NAME", "your_fine_tuned_model_deployment_name"
)  # "finetune-phi-deployment"

# The last fine-tuning job setup_ml.py submitted (it records it here; deploy_model.py reads it).
AZURE_ML_JOB_NAME = _setting("AZURE_ML_JOB_NAME", "")
# The last rehearsal job (`setup_ml.py --rehearsal`), which `deploy_model.py --rehearsal` deploys.
AZURE_ML_REHEARSAL_JOB_NAME = _setting("AZURE_ML_REHEARSAL_JOB_NAME", "")

# The endpoint the Prompt flow calls; deploy_model.py writes both into .env for you.
AZURE_ML_API_KEY = _setting("AZURE_ML_API_KEY", "your_fine_tuned_model_api_key")
AZURE_ML_ENDPOINT = _setting(
    "AZURE_ML_ENDPOINT", "your_fine_tuned_model_endpoint_uri"
)  # "https://{your-endpoint-name}.{your-region}.inference.ml.azure.com/score"

# Step 5, evaluate_chat.py (optional). An Azure OpenAI deployment that judges the answers with the
# Cookbook's AI-assisted evaluators (groundedness, relevance, coherence, fluency, similarity).
AZURE_OPENAI_ENDPOINT = _setting("AZURE_OPENAI_ENDPOINT", "your_azure_openai_endpoint")  # "https://{resource}.openai.azure.com"
AZURE_OPENAI_API_KEY = _setting("AZURE_OPENAI_API_KEY", "your_azure_openai_api_key")
AZURE_OPENAI_DEPLOYMENT = _setting("AZURE_OPENAI_DEPLOYMENT", "your_azure_openai_deployment")  # "gpt-4o"
AZURE_OPENAI_API_VERSION = _setting("AZURE_OPENAI_API_VERSION", "2024-10-21")
# An Azure AI project: its safety service judges the answers (self-harm, hate and unfairness, violence,
# sexual) and each evaluation is logged to it. A Foundry project's endpoint, or a hub-based project's name.
AZURE_AI_PROJECT = _setting(
    "AZURE_AI_PROJECT", "your_azure_ai_project_endpoint"
)  # "https://{resource}.services.ai.azure.com/api/projects/{project}"

# A value is a placeholder when it, or one path segment of it, still starts with "your_".
_PLACEHOLDER = re.compile(r"(^|/)your_")


def is_placeholder(value: str) -> bool:
    return bool(_PLACEHOLDER.search(value))


def placeholder_error(name: str) -> str:
    """The one-line message for a setting that still holds its placeholder."""
    value = globals()[name]
    if name == "AZURE_MANAGED_IDENTITY_RESOURCE_ID" and "AZURE_MANAGED_IDENTITY_RESOURCE_ID" not in os.environ:
        return (
            f"config: {name} is built from placeholders ({value}); set AZURE_SUBSCRIPTION_ID, "
            "AZURE_RESOURCE_GROUP_NAME and AZURE_MANAGED_IDENTITY_NAME in .env (copy .env.example) "
            "or export them"
        )
    return (
        f"config: {name} is still the placeholder '{value}'; set it in .env (copy .env.example) "
        f"or export {name}=..."
    )


def require(*names: str) -> None:
    """Stop the calling script with one line if a setting it needs is still a placeholder."""
    for name in names:
        if is_placeholder(globals()[name]):
            sys.exit(placeholder_error(name))


def saved_setting(name: str) -> str:
    """A setting as .env holds it now, read again from disk ("" if it holds none)."""
    return _read_env_file().get(name) or ""


def current_setting(name: str, default: str = "") -> str:
    """A setting as it is now: the environment, else .env read again from disk, else its default.

    For long-running processes (the Prompt flow) that must see a .env rewritten after they started.
    """
    return os.environ.get(name) or saved_setting(name) or globals().get(name, default)


def save_settings(**settings: str) -> Path:
    """Write settings into the untracked .env file (created if missing) and into this module, not into the
    environment: a process started afterwards reads them from .env, as current_setting() does."""
    ENV_FILE.touch(mode=0o600, exist_ok=True)
    for name, value in settings.items():
        set_key(str(ENV_FILE), name, value, quote_mode="never")
        globals()[name] = value
    return ENV_FILE
