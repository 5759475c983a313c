"""config.py: the tutorial's settings, overridable from the environment and .env, never from git."""

import importlib
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, is_a_setting, one_line_naming, run_script

TUTORIAL_DEFAULTS = {
    "AZURE_SUBSCRIPTION_ID": "your_subscription_id",
    "AZURE_RESOURCE_GROUP_NAME": "your_resource_group_name",
    "AZURE_ML_WORKSPACE_NAME": "your_workspace_name",
    "AZURE_MANAGED_IDENTITY_CLIENT_ID": "your_azure_managed_identity_client_id",
    "AZURE_MANAGED_IDENTITY_NAME": "your_azure_managed_identity_name",
    "TRAIN_DATA_PATH": "data/train_data.jsonl",
    "TEST_DATA_PATH": "data/test_data.jsonl",
    "AZURE_MODEL_NAME": "your_fine_tuned_model_name",
    "AZURE_ENDPOINT_NAME": "your_fine_tuned_model_endpoint_name",
    "AZURE_DEPLOYMENT_NAME": "your_fine_tuned_model_deployment_name",
    "AZURE_ML_API_KEY": "your_fine_tuned_model_api_key",
    "AZURE_ML_ENDPOINT": "your_fine_tuned_model_endpoint_uri",
}


@pytest.fixture
def load_config(tmp_path, monkeypatch):
    """Reload config.py (the same module object every script holds) with a given environment and .env."""
    import config

    env_file = tmp_path / ".env"
    monkeypatch.setenv("FINETUNE_PHI_ENV_FILE", str(env_file))

    def load(env=None, dotenv=None):
        for name in [name for name in os.environ if is_a_setting(name)]:
            monkeypatch.delenv(name, raising=False)
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        if dotenv is not None:
            env_file.write_text(dotenv)
        return importlib.reload(config)

    yield load
    monkeypatch.undo()
    importlib.reload(config)


def test_defaults_are_the_tutorials_placeholders(load_config):
    config = load_config()
    for name, value in TUTORIAL_DEFAULTS.items():
        assert getattr(config, name) == value, name
    assert config.AZURE_MANAGED_IDENTITY_RESOURCE_ID == (
        "/subscriptions/your_subscription_id/resourceGroups/your_resource_group_name/providers/"
        "Microsoft.ManagedIdentity/userAssignedIdentities/your_azure_managed_identity_name"
    )


def test_dotenv_and_environment_override_and_environment_wins(load_config):
    config = load_config(
        env={"AZURE_ML_WORKSPACE_NAME": "from-env"},
        dotenv="AZURE_SUBSCRIPTION_ID=sub-123\nAZURE_RESOURCE_GROUP_NAME=rg\nAZURE_ML_WORKSPACE_NAME=from-dotenv\n"
        "AZURE_MANAGED_IDENTITY_NAME=uai\n",
    )
    assert config.AZURE_SUBSCRIPTION_ID == "sub-123"
    assert config.AZURE_ML_WORKSPACE_NAME == "from-env"
    assert config.AZURE_MANAGED_IDENTITY_RESOURCE_ID == (
        "/subscriptions/sub-123/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/uai"
    )
    config.require("AZURE_SUBSCRIPTION_ID", "AZURE_ML_WORKSPACE_NAME", "AZURE_MANAGED_IDENTITY_RESOURCE_ID")


def test_require_names_the_unfilled_setting(load_config):
    config = load_config(env={"AZURE_SUBSCRIPTION_ID": "sub-123"})
    with pytest.raises(SystemExit) as stop:
        config.require("AZURE_SUBSCRIPTION_ID", "AZURE_ML_WORKSPACE_NAME")
    one_line_naming(str(stop.value), "AZURE_ML_WORKSPACE_NAME", "'your_workspace_name'", ".env.example",
                    "export AZURE_ML_WORKSPACE_NAME=")
    with pytest.raises(SystemExit) as stop:
        config.require("AZURE_MANAGED_IDENTITY_RESOURCE_ID")
    one_line_naming(str(stop.value), "AZURE_SUBSCRIPTION_ID", "AZURE_RESOURCE_GROUP_NAME", "AZURE_MANAGED_IDENTITY_NAME")


def test_unfilled_placeholder_stops_a_script_with_one_line(tmp_path):
    result = run_script(["-c", "import config; config.require('AZURE_ENDPOINT_NAME'); print('went on')"], cwd=ROOT)
    assert result.returncode == 1
    assert result.stdout == ""
    one_line_naming(result.stderr, "AZURE_ENDPOINT_NAME", "'your_fine_tuned_model_endpoint_name'", ".env.example",
                    "export AZURE_ENDPOINT_NAME=")


def test_save_settings_writes_dotenv_and_keeps_other_lines(load_config, tmp_path):
    config = load_config(dotenv="# mine\nAZURE_SUBSCRIPTION_ID=sub-123\nAZURE_ML_API_KEY=old\n")
    path = config.save_settings(AZURE_ML_ENDPOINT="http://127.0.0.1:5001/score", AZURE_ML_API_KEY="k3y")
    text = path.read_text()
    assert "# mine\nAZURE_SUBSCRIPTION_ID=sub-123\n" in text
    assert "AZURE_ML_API_KEY=k3y\n" in text and "old" not in text
    assert "AZURE_ML_ENDPOINT=http://127.0.0.1:5001/score\n" in text
    assert config.AZURE_ML_API_KEY == "k3y"
    assert load_config().AZURE_ML_ENDPOINT == "http://127.0.0.1:5001/score"


def test_a_new_env_file_is_readable_by_its_owner_only(load_config, tmp_path):
    config = load_config()
    path = config.save_settings(AZURE_ML_API_KEY="k3y")
    assert path == tmp_path / ".env"
    assert path.stat().st_mode & 0o777 == 0o600


def test_git_leaves_env_out_and_tracks_the_example(tmp_path):
    # A repository with the project's .gitignore, a filled .env and the example: `git add -A` takes the example only.
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    subprocess.run([*git, "init", "-q"], check=True)
    for name in (".gitignore", ".env.example"):
        (tmp_path / name).write_text((ROOT / name).read_text())
    (tmp_path / ".env").write_text("AZURE_ML_API_KEY=a-real-key\n")
    subprocess.run([*git, "add", "-A"], check=True)
    tracked = subprocess.run([*git, "ls-files"], capture_output=True, text=True, check=True).stdout.split()
    assert sorted(tracked) == [".env.example", ".gitignore"]
    assert subprocess.run([*git, "check-ignore", "-q", ".env"]).returncode == 0
    example = (ROOT / ".env.example").read_text()
    assert [name for name in TUTORIAL_DEFAULTS if name not in example] == []


def test_processes_started_after_save_settings_get_no_setting(load_config):
    config = load_config(dotenv="AZURE_SUBSCRIPTION_ID=sub-123\n")
    config.save_settings(AZURE_ML_ENDPOINT="http://127.0.0.1:5001/score", AZURE_ML_API_KEY="k3y")
    child = subprocess.run([sys.executable, "-c", "import json, os; print(json.dumps(sorted(os.environ)))"],
                           capture_output=True, text=True, check=True)
    assert [name for name in json.loads(child.stdout) if is_a_setting(name)] == []
    assert config.current_setting("AZURE_ML_API_KEY") == "k3y"  # where this process and the flow read it


def test_env_file_is_read_not_exported_and_can_be_read_again(load_config, tmp_path, monkeypatch):
    config = load_config(dotenv="AZURE_ML_ENDPOINT=http://old/score\n")
    assert "AZURE_ML_ENDPOINT" not in os.environ, "processes the scripts start must not inherit .env"
    (tmp_path / ".env").write_text("AZURE_ML_ENDPOINT=http://new/score\n")
    assert config.AZURE_ML_ENDPOINT == "http://old/score"  # read once, at import
    assert config.current_setting("AZURE_ML_ENDPOINT") == "http://new/score"  # what the flow asks each time
    monkeypatch.setenv("AZURE_ML_ENDPOINT", "http://exported/score")
    assert config.current_setting("AZURE_ML_ENDPOINT") == "http://exported/score"
    assert config.current_setting("AZURE_ML_TEMPERATURE") == ""
