"""setup_ml.py through the real, unpatched azure-ai-ml MLClient, against Azure's REST API as tests/azure_rest.py
stands in for it: the pre-flight's lists, the cluster created, the job submitted and streamed to each end."""

import pytest

from azure_rest import LOCATION, SUBSCRIPTION, AzureMLStandIn, reach_stand_in, usage, wait_for_pollers
from conftest import run_main

import config  # noqa: I001  (the same module object the scripts hold)
import setup_ml

A100 = "Standard_NC24ads_A100_v4"


@pytest.fixture
def azure(tmp_path, monkeypatch, chat_files):
    """The stand-in, reached by setup_ml.py's real MLClient; the data files in place; .env in tmp_path."""
    stand_in = reach_stand_in(monkeypatch, tmp_path, setup_ml)
    monkeypatch.setattr(config, "TRAIN_DATA_PATH", str(chat_files[0]))
    monkeypatch.setattr(config, "TEST_DATA_PATH", str(chat_files[1]))
    for name in ("AZURE_ML_JOB_NAME", "AZURE_ML_REHEARSAL_JOB_NAME"):  # save_settings() sets them (run_main undoes
        monkeypatch.setattr(config, name, "")  # what it exports to the environment)
    yield stand_in
    wait_for_pollers()
    stand_in.close()


def job_line(result) -> str:
    """The learner's last line: what the script exits with (stderr) or, failing that, its last printed line."""
    lines = (result.stderr.strip() or result.stdout.strip()).splitlines()
    return lines[-1] if lines else ""


def submitted_job(azure) -> dict:
    (put,) = [r for r in azure.requests if r["method"] == "PUT" and "/jobs/" in r["path"]]
    return put


def job_name(azure) -> str:
    """The name azure-ai-ml gave the job it submitted."""
    return submitted_job(azure)["path"].split("/jobs/")[1].split("?")[0]


def test_a_cluster_is_created_and_the_job_streamed_to_completed(azure, tmp_path):
    azure.job_statuses = ["Queued", "Running", "Running", "Completed"]
    result = run_main(setup_ml.main, [], tmp_path)

    assert result.returncode == 0, result.stderr
    # The pre-flight read the region's lists before anything was created.
    order = [(r["method"], r["path"].split("?")[0].rsplit("/", 1)[-1]) for r in azure.requests
             if r["headers"]["Host"] == AzureMLStandIn.ARM]
    assert order.index(("GET", "usages")) < order.index(("PUT", "gpu-nc24s-a100-v4"))
    assert f"needs 24 standardNCADSA100v4Family vCPUs in {LOCATION}" in result.stdout
    # The cluster: created as an ARM long-running operation, polled to Succeeded, scaling 0..1.
    (create,) = azure.called("PUT", "/computes/gpu-nc24s-a100-v4")
    cluster = create["body"]["properties"]
    assert create["body"]["location"] == LOCATION and cluster["computeType"] == "AmlCompute"
    assert cluster["properties"]["vmSize"] == A100 and cluster["properties"]["vmPriority"] == "Dedicated"
    assert cluster["properties"]["scaleSettings"]["minNodeCount"] == 0
    assert cluster["properties"]["scaleSettings"]["maxNodeCount"] == 1
    assert [r for r in azure.requests if "computeOperationsStatus" in r["path"]]
    assert azure.resource("/computes/gpu-nc24s-a100-v4")["properties"]["provisioningState"] == "Succeeded"
    # The job: its code snapshot and data uploaded to the workspace's storage, then submitted with its limit.
    assert any(path.endswith("/finetuning_dir/fine_tune.py") for path in azure.blobs)
    assert any(path.endswith("/train.jsonl") for path in azure.blobs)
    job, name = submitted_job(azure)["body"]["properties"], job_name(azure)
    assert job["computeId"].endswith("/computes/gpu-nc24s-a100-v4") and job["limits"]["timeout"] == "PT4H"
    assert "/environments/phi-3-training-environment/versions/" in job["environmentId"]
    assert "python fine_tune.py" in job["command"] and "/codes/" in job["codeId"]
    # Streamed: the run history's log, then the end; the name is in .env for deploy_model.py.
    assert "Streaming user_logs/std_log.txt" in result.stdout and "Saved the model" in result.stdout
    assert f"AZURE_ML_JOB_NAME={name}\n" in (tmp_path / ".env").read_text()


def test_a_failed_job_ends_with_azures_error_code_and_message(azure, tmp_path):
    azure.job_statuses = ["Running", "Failed"]
    result = run_main(setup_ml.main, [], tmp_path)

    name = job_name(azure)
    assert result.returncode == 1
    (line,) = [line for line in result.stderr.splitlines() if f"job {name} failed:" in line]
    assert "UserError" in line  # error.code
    assert "User process 'python' exited with status code 1" in line, line  # error.message, not "{"


@pytest.mark.parametrize("end", ["Canceled", "NotResponding"])
def test_a_job_that_ends_canceled_or_not_responding_exits_non_zero(azure, tmp_path, end):
    azure.job_statuses = ["Running", end]
    result = run_main(setup_ml.main, [], tmp_path)

    line = job_line(result)
    assert result.returncode == 1, result.stdout[-2000:]
    assert job_name(azure) in line and f" {end}," in line, line


def test_ctrl_c_while_streaming_says_the_job_runs_on_and_how_to_cancel_it(azure, tmp_path):
    # Ctrl-C arrives while azure-ai-ml waits on the run history's third answer (SIGINT to the main thread,
    # as the terminal sends it), which azure-ai-ml turns into its JobException "...still executing...".
    azure.job_statuses = ["Running"]
    azure.ctrl_c_at("run details", 3)
    result = run_with_ctrl_c(tmp_path)

    name = job_name(azure)
    assert result.returncode == 130  # as a shell reports a command stopped by Ctrl-C
    assert "failed" not in result.stderr.lower()
    (runs,) = [line for line in result.stderr.splitlines() if f"job {name} still runs" in line]
    assert "US$3.67/h" in runs and "4 h" in runs  # what it bills an hour, until its time limit
    assert f"python setup_ml.py --cancel {name}" in job_line(result)
    assert not [r for r in azure.requests if r["path"].split("?")[0].endswith("/cancel")]  # it runs on


def run_with_ctrl_c(tmp_path):
    try:
        return run_main(setup_ml.main, [], tmp_path)
    except KeyboardInterrupt:  # as the learner would see it: a traceback (and the run of the tests goes on)
        pytest.fail("Ctrl-C while streaming ended setup_ml.py with a KeyboardInterrupt traceback")


def test_the_cancel_command_it_gives_cancels_the_job(azure, tmp_path):
    azure.job_statuses = ["Running"]
    azure.ctrl_c_at("run details", 3)
    run_with_ctrl_c(tmp_path)
    name = job_name(azure)

    result = run_main(setup_ml.main, ["--cancel", name], tmp_path)

    assert result.returncode == 0, result.stderr
    (cancel,) = azure.called("POST", f"/jobs/{name}/cancel")  # Job/cancel.json: 202, then its Location
    assert azure.resource(f"/jobs/{name}")["properties"]["status"] == "CancelRequested"
    assert name in result.stdout


def test_short_quota_stops_before_anything_is_created(azure, tmp_path):
    azure.usages = [usage("standardNCADSA100v4Family", used=96, limit=96)]
    result = run_main(setup_ml.main, [], tmp_path)

    assert result.returncode == 1
    assert "needs 24 vCPUs, 0 available (96 of 96 in use)" in result.stderr
    assert not [r for r in azure.requests if r["method"] == "PUT"]


def test_a_quota_list_answering_403_is_said_and_the_run_goes_on(azure, tmp_path):
    azure.forbidden = {"usages"}
    result = run_main(setup_ml.main, ["--no-stream"], tmp_path)

    assert result.returncode == 0, result.stderr
    (said,) = [line for line in result.stdout.splitlines() if "quota list" in line]
    assert "AuthorizationFailed" in said and "going on" in said
    assert azure.called("PUT", "/computes/gpu-nc24s-a100-v4")


def test_a_size_list_answering_403_is_said_in_one_line(azure, tmp_path):
    azure.forbidden = {"vmSizes"}
    result = run_main(setup_ml.main, ["--no-stream"], tmp_path)

    said = result.stdout + result.stderr
    assert result.returncode == 0, said[-2000:]
    (line,) = [line for line in said.splitlines() if "AuthorizationFailed" in line]
    assert "list of VM sizes" in line and LOCATION in line and "going on" in line
    assert submitted_job(azure)  # it could not know, so it said so and went on


def test_a_size_the_region_does_not_offer_stops_before_anything_is_created(azure, tmp_path):
    azure.sizes = [s for s in azure.sizes if s["name"] != A100]
    result = run_main(setup_ml.main, [], tmp_path)

    assert result.returncode != 0
    assert A100 in job_line(result) and LOCATION in job_line(result)
    assert not [r for r in azure.requests if r["method"] == "PUT"]


def test_a_family_missing_from_the_quota_list_stops_before_anything_is_created(azure, tmp_path):
    azure.usages = [u for u in azure.usages if u["name"]["value"] != "standardNCADSA100v4Family"]
    result = run_main(setup_ml.main, [], tmp_path)

    assert result.returncode != 0
    assert "standardNCADSA100v4Family" in job_line(result) and LOCATION in job_line(result)
    assert not [r for r in azure.requests if r["method"] == "PUT"]


def test_a_reused_clusters_quota_is_checked(azure, tmp_path):
    # The cluster exists, scaled to 0: its node takes 24 vCPUs again when the job starts, and others hold them.
    azure.add_cluster("gpu-nc24s-a100-v4", A100, nodes=0)
    azure.usages = [usage("standardNCADSA100v4Family", used=96, limit=96)]
    result = run_main(setup_ml.main, [], tmp_path)

    said = result.stdout + result.stderr
    assert "24" in said and "96 of 96" in said, said[-1500:]
    assert not [r for r in azure.requests if r["method"] == "PUT" and "/jobs/" in r["path"]]


def test_a_quota_list_worded_as_microsofts_example_does_not_stop_the_run(azure, tmp_path):
    """Usage/list.json (2023-08-01-preview, as learn.microsoft.com shows it for 2025-06-01 too) writes each family's
    label in name.value as well, the family's id only in the entry's id: were Azure to answer so, the pre-flight
    must not stop a learner whose quota is there."""
    label = "Standard NCADSA100v4 Family Cluster Dedicated vCPUs"
    azure.usages = [{**usage("standardNCADSA100v4Family", 0, 96, label),
                     "id": f"/subscriptions/{SUBSCRIPTION}/usages/Standard_NCADSA100v4_Family_Cluster_Dedicated_vCPUs",
                     "name": {"value": label, "localizedValue": label}}]
    result = run_main(setup_ml.main, ["--no-stream"], tmp_path)

    assert result.returncode == 0, result.stderr
    assert submitted_job(azure)
