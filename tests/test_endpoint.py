"""The local endpoint over real HTTP: Azure's scoring contract in front of the fine-tuned tiny model.

Each contract test runs against both servers: azmlinfsrv, started with the learner's command
`python deploy_model.py --local` (the session's `endpoint`), and the uvicorn fallback
(`python -m local.endpoint --server uvicorn`), which serves the same local/score.py.
"""

import signal
import subprocess

import pytest
import requests
from transformers import AutoTokenizer

from chat_fixtures import ANSWER, QUESTION, Endpoint, endpoint, free_port, port_is_open  # noqa: F401
from conftest import ROOT, run_script

KEY = "a-key-the-learner-exported"


@pytest.fixture(scope="module")
def uvicorn_endpoint(fine_tuned_model, tmp_path_factory):
    server = Endpoint(fine_tuned_model, tmp_path_factory.mktemp("uvicorn-endpoint"), server="uvicorn", key=KEY)
    yield server.wait_until_live()
    server.stop()


@pytest.fixture(params=["azmlinfsrv", "uvicorn"])
def served(request):
    return request.getfixturevalue("endpoint" if request.param == "azmlinfsrv" else "uvicorn_endpoint")


def test_azmlinfsrv_is_the_default_server(endpoint):
    response = endpoint.post({"input_data": [QUESTION]})
    assert response.headers["x-ms-server-version"] == "azmlinfsrv/1.5.1"
    assert "Starting azmlinfsrv with" in endpoint.output()


def test_liveness_route(served):
    response = requests.get(served.liveness_url, timeout=10)
    assert response.status_code == 200
    assert response.text == "Healthy"


def test_uri_and_key_are_written_to_env_file(endpoint, uvicorn_endpoint):
    # No key set: a fresh random one. AZURE_ML_API_KEY set: that one.
    generated = endpoint.settings()
    assert generated["AZURE_ML_ENDPOINT"] == f"http://127.0.0.1:{endpoint.port}/score"
    assert len(generated["AZURE_ML_API_KEY"]) >= 32
    assert generated["AZURE_ML_API_KEY"] not in uvicorn_endpoint.output() + endpoint.output()
    assert uvicorn_endpoint.settings() == {
        "AZURE_ML_ENDPOINT": f"http://127.0.0.1:{uvicorn_endpoint.port}/score", "AZURE_ML_API_KEY": KEY
    }
    assert f"Local endpoint ready: http://127.0.0.1:{endpoint.port}/score" in endpoint.output()


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic dXNlcjpwYXNz", "Bearer "])
def test_requests_without_the_key_get_401(served, header):
    headers = {"Authorization": header} if header else {}
    response = requests.post(served.url, json={"input_data": [QUESTION]}, headers=headers, timeout=30)
    assert response.status_code == 401
    assert "AZURE_ML_API_KEY" in response.json()["message"]


def test_a_list_of_questions_gets_a_list_of_answers(served):
    response = served.post(
        {"input_data": [QUESTION, "What is LoRA?"], "params": {"do_sample": False, "max_new_tokens": 40}}
    )
    assert response.status_code == 200
    assert response.json() == [ANSWER, "LoRA trains small low-rank adapters instead of every weight of the model."]


def test_the_pandas_split_form_is_accepted(served):
    body = {
        "input_data": {"columns": ["prompt"], "index": [0, 1], "data": [[QUESTION], ["Where is Microsoft based?"]]},
        "params": {"do_sample": False},
    }
    response = served.post(body)
    assert response.status_code == 200
    assert response.json() == [ANSWER, "Microsoft is based in Redmond, Washington."]


def test_params_are_honoured(served, fine_tuned_model):
    tokenizer = AutoTokenizer.from_pretrained(fine_tuned_model / "components" / "tokenizer")
    (short,) = served.post({"input_data": [QUESTION], "params": {"max_new_tokens": 3, "do_sample": False}}).json()
    assert len(tokenizer(short, add_special_tokens=False)["input_ids"]) == 3
    assert ANSWER.startswith(short.strip())

    (full,) = served.post({"input_data": [QUESTION], "params": {"return_full_text": True, "do_sample": False}}).json()
    assert full.startswith(f"<|user|>\n{QUESTION}<|end|>\n<|assistant|>\n")
    assert full.endswith(ANSWER)

    hot = served.post(
        {"input_data": [QUESTION] * 4, "params": {"do_sample": True, "temperature": 5.0, "max_new_tokens": 12}}
    ).json()
    assert len(set(hot)) > 1, "a temperature of 5 with sampling should vary the answers"


@pytest.mark.parametrize(
    "body, message",
    [
        ("{not json", "request body is not valid JSON"),
        ("", "request body is empty"),
        ({"inputs": [QUESTION]}, "request body has no 'input_data'"),
        ({"input_data": []}, "'input_data' is empty"),
        ({"input_data": QUESTION}, "'input_data' must be a list of strings, got str"),
        ({"input_data": ["  "]}, "input_data[0] is empty"),
        ({"input_data": [QUESTION, 42]}, "input_data[1] must be a string, got 42"),
        ({"input_data": {"columns": ["a", "b"], "data": [["x", "y"]]}}, "needs one column and a 'data' list"),
        ({"input_data": {"columns": ["prompt"], "data": []}}, "'input_data' is empty"),
        ({"input_data": [QUESTION], "params": [1]}, "'params' must be an object, got list"),
        ({"input_data": [QUESTION], "params": {"temperature": "hot"}}, "param 'temperature' must be a number, got \"hot\""),
        ({"input_data": [QUESTION], "params": {"max_new_tokens": 2.5}}, "param 'max_new_tokens' must be an integer"),
        ({"input_data": [QUESTION], "params": {"max_new_tokens": True}}, "param 'max_new_tokens' must be an integer"),
        ({"input_data": [QUESTION], "params": {"do_sample": "yes"}}, "param 'do_sample' must be a boolean"),
        ({"input_data": [QUESTION], "params": {"max_new_tokens": 0}}, "'max_new_tokens' must be at least 1"),
        ({"input_data": [QUESTION], "params": {"temperature": 0}}, "'temperature' must be above 0"),
        ({"input_data": [QUESTION], "params": {"top_q": 0.5}}, "unknown param 'top_q'; this model takes: "),
    ],
)
def test_bad_requests_get_400_with_a_message(served, body, message):
    response = served.post(body)
    assert response.status_code == 400
    assert message in response.json()["message"]


def test_a_folder_that_is_not_a_model_is_refused(tmp_path):
    result = run_script(["-m", "local.endpoint", "--model-dir", tmp_path, "--port", free_port()], cwd=ROOT,
                        env={"FINETUNE_PHI_ENV_FILE": str(tmp_path / ".env")}, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"local endpoint: {tmp_path} is not an MLflow model folder (no MLmodel file); pass the folder "
        "fine_tune.py wrote as --model_output_dir, e.g. outputs/models/<run>/model"
    )
    assert not (tmp_path / ".env").exists()


def test_a_busy_port_is_refused(endpoint, fine_tuned_model, tmp_path):
    result = run_script(["-m", "local.endpoint", "--model-dir", fine_tuned_model, "--port", endpoint.port], cwd=ROOT,
                        env={"FINETUNE_PHI_ENV_FILE": str(tmp_path / ".env")}, timeout=120)
    assert result.returncode == 1
    assert f"port {endpoint.port} on 127.0.0.1 is in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_local_model_names_the_fix(tmp_path, monkeypatch):
    from local import endpoint as local_endpoint

    monkeypatch.setattr(local_endpoint, "MODELS", ROOT / "outputs" / "no-models-here")
    with pytest.raises(SystemExit) as stop:
        local_endpoint.latest_local_model()
    assert "no fine-tuned model in outputs/no-models-here/<run>/model; run `make local`" in str(stop.value)

    # The newest run folder holding an MLmodel wins; a run without one is skipped.
    for run, has_model in (("20240101-000000", True), ("20250101-000000", True), ("20260101-000000", False)):
        (tmp_path / run / "model").mkdir(parents=True)
        if has_model:
            (tmp_path / run / "model" / "MLmodel").write_text("flavors: {}\n")
    monkeypatch.setattr(local_endpoint, "MODELS", tmp_path)
    assert local_endpoint.latest_local_model() == tmp_path / "20250101-000000" / "model"


@pytest.mark.parametrize("server, sig", [("azmlinfsrv", signal.SIGINT), ("uvicorn", signal.SIGTERM)])
def test_ctrl_c_or_sigterm_stops_the_server_too(fine_tuned_model, tmp_path, server, sig):
    local = Endpoint(fine_tuned_model, tmp_path, server=server).wait_until_live()
    children = subprocess.run(["pgrep", "-P", str(local.process.pid)], capture_output=True, text=True).stdout.split()
    assert len(children) == 1, "the endpoint command runs the server as one child process"
    local.process.send_signal(sig)
    assert local.process.wait(timeout=30) in (0, -sig)
    assert not port_is_open(local.port)
    assert subprocess.run(["ps", "-p", children[0]], capture_output=True).returncode == 1, "server left running"
    local.stop()


def test_help_explains_every_flag():
    result = run_script(["-m", "local.endpoint", "--help"], cwd=ROOT)
    assert result.returncode == 0
    for flag in ("--model-dir", "--port", "--host", "--server"):
        assert flag in result.stdout


def test_without_the_azmlinfsrv_virtualenv_uvicorn_serves(tmp_path, monkeypatch):
    from local import endpoint as local_endpoint

    assert local_endpoint.choose_server("auto") == "azmlinfsrv"  # `make setup` built .venv-azmlinfsrv
    monkeypatch.setattr(local_endpoint, "AZMLINFSRV_VENV", tmp_path / ".venv-azmlinfsrv")
    assert local_endpoint.choose_server("auto") == "uvicorn"
    with pytest.raises(SystemExit, match=r"\.venv-azmlinfsrv is not built; run `make setup`, or pass --server uvicorn"):
        local_endpoint.choose_server("azmlinfsrv")
