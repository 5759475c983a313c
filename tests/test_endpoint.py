"""The local endpoint over real HTTP: `python deploy_model.py --local` on the fine-tuned tiny model.

The table below pins each request to the status and message the local endpoint gives it. The int4
deployment runs this same scoring script (serving/scoring/score.py) on Azure; what Azure's own MLflow
scoring script answers for the transformers form cannot run here, and is recorded, with its source,
in docs/local-endpoint.md.
"""

import json
import re
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import requests
from transformers import AutoTokenizer

from chat_fixtures import ANSWER, QUESTION, Endpoint, endpoint, eventually, free_port, port_is_open  # noqa: F401
from conftest import ROOT, one_line_naming, options_without_help, run_script

USAGE = 'send {"input_data": ["your question"], "params": {"max_new_tokens": 128}}'
GREEDY = {"do_sample": False, "max_new_tokens": 40}

# (request, body, content type, the local status, the local message)
REQUESTS = [
    ("a list of questions with params", {"input_data": [QUESTION], "params": GREEDY}, None, 200, None),
    ("params null", {"input_data": [QUESTION], "params": None}, None, 200, None),
    ("no params", {"input_data": [QUESTION]}, None, 200, None),
    ("an int temperature", {"input_data": [QUESTION], "params": {"temperature": 1, "max_new_tokens": 4}}, None,
     200, None),
    ("an unknown param", {"input_data": [QUESTION], "params": {"top_k": 5, **GREEDY}}, None, 200, None),
    ("the pandas split form", {"input_data": {"columns": ["prompt"], "index": [0], "data": [[QUESTION]]}}, None,
     400, "'input_data': Invalid input data type to parse. Expected: <class 'list'> but got <class 'dict'>"),
    ("a bare string", {"input_data": QUESTION}, None,
     400, "'input_data': Invalid input data type to parse. Expected: <class 'list'> but got <class 'str'>"),
    ("an empty list", {"input_data": []}, None, 400, "'input_data' is empty; send at least one question"),
    ("a question that is not a string", {"input_data": [QUESTION, 42]}, None,
     400, "input_data[1] must be a question (a non-empty string), got '42'"),
    ('max_new_tokens "8"', {"input_data": [QUESTION], "params": {"max_new_tokens": "8"}}, None,
     400, "max_new_tokens"),
    ("max_new_tokens 8.0", {"input_data": [QUESTION], "params": {"max_new_tokens": 8.0}}, None,
     400, "max_new_tokens"),
    ("max_new_tokens 0", {"input_data": [QUESTION], "params": {"max_new_tokens": 0}}, None,
     400, "param 'max_new_tokens' must be at least 1, got 0"),
    ("params not an object", {"input_data": [QUESTION], "params": [1]}, None,
     400, "'params': Invalid input data type to parse. Expected: <class 'dict'> but got <class 'list'>"),
    ("temperature 0 with sampling", {"input_data": [QUESTION], "params": {"temperature": 0}}, None,
     400, "param 'temperature' must be above 0 when sampling, got 0"),
    ("no input_data", {"inputs": [QUESTION]}, None, 400, "A value is not provided for the 'input_data' parameter."),
    ("invalid JSON", "{not json", None, 400, "POST body could not be decoded as JSON"),
    ("an empty body", "", None, 400, "POST body is empty. Expecting a JSON dictionary."),
    ("a JSON list as the body", [QUESTION], None, 400, "POST body should be a JSON dictionary."),
    ("a content type that is not JSON", {"input_data": [QUESTION]}, "text/plain",
     415, "Expects Content-Type to be application/json"),
]


@pytest.mark.parametrize("what, body, content_type, local, message", REQUESTS, ids=[row[0] for row in REQUESTS])
def test_the_endpoint_accepts_what_the_flow_sends_and_names_what_it_refuses(endpoint, what, body, content_type,
                                                                           local, message):
    response = endpoint.post(body, content_type=content_type or "application/json")
    assert response.status_code == local, response.text
    if local == 200:
        answers = response.json()
        assert isinstance(answers, list) and len(answers) == len(body["input_data"])
        assert all(isinstance(answer, str) for answer in answers)
    else:
        assert message in response.json()["message"]


def test_stricter_rows_say_how_to_ask(endpoint):
    response = endpoint.post({"input_data": QUESTION})
    assert response.json()["message"].endswith(USAGE)


def test_an_unknown_param_is_ignored_with_a_logged_warning(endpoint):
    response = endpoint.post({"input_data": [QUESTION], "params": {"top_k": 5, **GREEDY}})
    assert response.json() == [ANSWER]
    warned = lambda: re.search(r"top_k.*ignored|ignored.*top_k", endpoint.output(), re.I)  # noqa: E731
    assert eventually(warned, timeout=10), endpoint.output()[-2000:]


def test_azmlinfsrv_is_the_server(endpoint):
    response = endpoint.post({"input_data": [QUESTION], "params": GREEDY})
    assert response.headers["x-ms-server-version"] == "azmlinfsrv/1.5.1"
    assert "Starting azmlinfsrv with" in endpoint.output()


def test_liveness_route_needs_no_key(endpoint):
    response = requests.get(endpoint.liveness_url, timeout=10)
    assert response.status_code == 200
    assert response.text == "Healthy"


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "Basic dXNlcjpwYXNz", "Bearer "])
def test_requests_without_the_key_get_401_before_anything_else(endpoint, header):
    headers = {"Authorization": header} if header else {}
    # As at Azure's gateway, the key is checked before the body: even a bad body gets 401.
    for data in (json.dumps({"input_data": [QUESTION]}), "{not json"):
        response = requests.post(endpoint.url, data=data, headers={**headers, "Content-Type": "application/json"},
                                 timeout=30)
        assert response.status_code == 401
        assert "AZURE_ML_API_KEY" in response.json()["message"]


def test_a_list_of_questions_gets_a_list_of_answers(endpoint):
    response = endpoint.post({"input_data": [QUESTION, "What is LoRA?"], "params": GREEDY})
    assert response.json() == [ANSWER, "LoRA trains small low-rank adapters instead of every weight of the model."]


def test_params_are_honoured(endpoint, fine_tuned_model):
    tokenizer = AutoTokenizer.from_pretrained(fine_tuned_model / "components" / "tokenizer")
    (short,) = endpoint.post({"input_data": [QUESTION], "params": {"max_new_tokens": 3, "do_sample": False}}).json()
    assert len(tokenizer(short, add_special_tokens=False)["input_ids"]) == 3
    assert ANSWER.startswith(short.strip())

    (full,) = endpoint.post({"input_data": [QUESTION], "params": {"return_full_text": True, **GREEDY}}).json()
    assert full.startswith(f"<|user|>\n{QUESTION}<|end|>\n<|assistant|>\n")
    assert full.endswith(ANSWER)

    hot = endpoint.post(
        {"input_data": [QUESTION] * 4, "params": {"do_sample": True, "temperature": 5.0, "max_new_tokens": 12}}
    ).json()
    assert len(set(hot)) > 1, "a temperature of 5 with sampling should vary the answers"


def test_uri_and_key_are_written_to_env_file(endpoint):
    written = endpoint.settings()
    assert written["AZURE_ML_ENDPOINT"] == f"http://127.0.0.1:{endpoint.port}/score"
    assert len(written["AZURE_ML_API_KEY"]) >= 32
    assert written["AZURE_ML_API_KEY"] not in endpoint.output()
    assert f"Local endpoint ready: http://127.0.0.1:{endpoint.port}/score" in endpoint.output()


def server_environments(endpoint: Endpoint) -> list[dict]:
    """The environment of each process under the endpoint's command: azmlinfsrv and its worker."""
    return [process.environ() for process in endpoint.descendants()]


def test_the_server_gets_its_key_and_no_setting(endpoint):
    # The key the endpoint wrote to .env reaches its server as the key it checks, and only so.
    environments = server_environments(endpoint)
    assert environments and all(env["LOCAL_ENDPOINT_KEY"] == endpoint.key for env in environments)
    assert [sorted(name for name in env if name.startswith("AZURE_")) for env in environments] == [[]] * len(environments)


def test_a_restart_keeps_the_local_key_and_an_azure_one_is_never_reused(fine_tuned_model, tmp_path):
    env_file = tmp_path / ".env"
    azure = "https://finetune-phi-endpoint.eastus2.inference.ml.azure.com/score"
    env_file.write_text(f"AZURE_ML_ENDPOINT={azure}\nAZURE_ML_API_KEY=the-azure-key\n")
    local = Endpoint(fine_tuned_model, tmp_path, AZURE_OPENAI_API_KEY="exported-in-the-learners-shell")
    try:
        local.wait_until_live()
        assert local.key != "the-azure-key"
        assert all("AZURE_OPENAI_API_KEY" not in env for env in server_environments(local))
        (replaced,) = [line for line in local.output().splitlines() if azure in line]
        one_line_naming(replaced, str(env_file), "`python deploy_model.py --connect`")
        first_key = local.key
    finally:
        local.stop()
    again = Endpoint(fine_tuned_model, tmp_path)
    try:
        again.wait_until_live()
        assert again.key == first_key, "a restarted local endpoint keeps its key"
        assert again.post({"input_data": [QUESTION], "params": GREEDY}).json() == [ANSWER]
    finally:
        again.stop()


def test_a_folder_that_is_not_a_model_is_refused(tmp_path):
    result = run_script(["-m", "serving.local_endpoint", "--model-dir", tmp_path, "--port", free_port()], cwd=ROOT,
                        env={"FINETUNE_PHI_ENV_FILE": str(tmp_path / ".env")}, timeout=120)
    assert result.returncode == 1
    one_line_naming(result.stderr, str(tmp_path), "MLmodel", "--model_output_dir")
    assert not (tmp_path / ".env").exists()


def test_a_busy_port_is_refused(endpoint, fine_tuned_model, tmp_path):
    result = run_script(["-m", "serving.local_endpoint", "--model-dir", fine_tuned_model, "--port", endpoint.port], cwd=ROOT,
                        env={"FINETUNE_PHI_ENV_FILE": str(tmp_path / ".env")}, timeout=120)
    assert result.returncode == 1
    assert f"port {endpoint.port} on 127.0.0.1 is in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_no_local_model_names_the_fix(tmp_path, monkeypatch):
    from serving import local_endpoint

    monkeypatch.setattr(local_endpoint, "MODELS", ROOT / "outputs" / "no-models-here")
    with pytest.raises(SystemExit) as stop:
        local_endpoint.latest_local_model("model-int4")
    one_line_naming(str(stop.value), "outputs/no-models-here/<run>/model-int4", "`make local`", "--model-dir")

    # The newest run folder holding an MLmodel wins; a run without one is skipped.
    for run, has_model in (("20240101-000000", True), ("20250101-000000", True), ("20260101-000000", False)):
        (tmp_path / run / "model").mkdir(parents=True)
        if has_model:
            (tmp_path / run / "model" / "MLmodel").write_text("flavors: {}\n")
    monkeypatch.setattr(local_endpoint, "MODELS", tmp_path)
    assert local_endpoint.latest_local_model() == tmp_path / "20250101-000000" / "model"


def test_without_the_azmlinfsrv_virtualenv_the_fix_is_named(tmp_path, monkeypatch):
    from serving import local_endpoint

    monkeypatch.setattr(local_endpoint, "AZMLINFSRV_VENV", tmp_path / ".venv-azmlinfsrv")
    with pytest.raises(SystemExit, match=r"\.venv-azmlinfsrv \(Azure's inference server\) is not built; run `make setup`"):
        local_endpoint.azmlinfsrv_python()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_or_sigterm_stops_the_server_and_its_workers_while_it_generates(fine_tuned_model, tmp_path, sig):
    local = Endpoint(fine_tuned_model, tmp_path)
    try:
        local.wait_until_live()
        seen = {p.pid: p for p in local.descendants()}
        assert any("serving.gateway" in " ".join(p.cmdline()) for p in seen.values()), "azmlinfsrv runs under the command"

        def used() -> float:
            """CPU seconds of every process seen under the command (a worker may start after it answers live)."""
            seen.update((p.pid, p) for p in local.descendants() if p.pid not in seen)
            return sum(p.cpu_times().user for p in seen.values() if p.is_running())

        # Keep a worker busy, question after question, so that the signal arrives while it generates
        # (sampled answers end at a random length: one long answer cannot be counted on).
        stopping = threading.Event()
        body = {"input_data": [QUESTION] * 8, "params": {"max_new_tokens": 2000, "do_sample": True, "temperature": 5.0}}

        def keep_asking():
            while not stopping.is_set():
                _post_quietly(local, body)

        busy = threading.Thread(target=keep_asking)
        before = used()
        busy.start()
        eventually(lambda: used() > before + 0.5, timeout=60)  # a worker is generating (slowly, on a busy machine)
        servers = list(seen.values())
        started = time.monotonic()
        local.process.send_signal(sig)
        stopping.set()
        assert local.process.wait(timeout=30) in (0, -sig)
        took = time.monotonic() - started
        assert took < 15, f"stopping took {took:.1f} s"
        gone = psutil.wait_procs(servers, timeout=5)[1] == []
        assert gone, "the server or a worker was left running"
        assert not port_is_open(local.port)
        busy.join(timeout=30)
    finally:
        local.stop()


def test_a_wait_written_to_a_log_is_a_few_whole_lines(tmp_path, capfd):
    # `make local > make-local.log 2>&1`: a server that takes seconds to be live gets a bar's first and last
    # state, each on a line of its own, not a line (or a carriage return) per poll.
    from serving import processes

    port = free_port()
    server = (f"import time, http.server; time.sleep(3); "
              f"http.server.HTTPServer(('127.0.0.1', {port}), http.server.SimpleHTTPRequestHandler).serve_forever()")
    with processes.serve([sys.executable, "-c", server], f"http://127.0.0.1:{port}/", log=tmp_path / "server.log",
                         cwd=tmp_path, progress="Loading the int4 model") as live:
        assert live.live_s >= 3
    written = capfd.readouterr().err
    assert "\r" not in written
    first, last = written.splitlines()
    assert first == "Loading the int4 model: 00:00 waited"
    assert re.fullmatch(r"Loading the int4 model: 00:0[3-9] waited", last), last


@pytest.mark.parametrize("own_session", [True, False])
def test_stop_ends_a_server_and_its_children_in_or_out_of_a_session_of_their_own(own_session):
    from serving.processes import stop

    # A parent that ignores SIGINT (as a busy worker does) with a child of its own.
    script = ("import signal, subprocess, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)")
    process = subprocess.Popen([sys.executable, "-c", script], start_new_session=own_session)
    children = []
    try:
        deadline = time.monotonic() + 10
        while not children and time.monotonic() < deadline:
            children = psutil.Process(process.pid).children()
            time.sleep(0.05)
        assert children, "the stand-in server did not start its child"
        started = time.monotonic()
        stop(process, grace_s=1, sig=signal.SIGINT)
        assert time.monotonic() - started < 10
        assert process.returncode == -signal.SIGKILL
        assert psutil.wait_procs(children, timeout=5)[1] == [], "the child outlived its server"
    finally:
        for p in children:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        if process.poll() is None:
            process.kill()
        process.wait()


def _post_quietly(endpoint, body):
    try:
        endpoint.post(body)
    except requests.RequestException:
        pass  # the server goes away mid-answer: that is the point


def test_help_explains_every_flag():
    from serving import local_endpoint

    result = run_script(["-m", "serving.local_endpoint", "--help"], cwd=ROOT)
    assert result.returncode == 0 and result.stdout.startswith("usage:"), result.stderr
    assert options_without_help(local_endpoint.main) == []


TIMEOUT_CHECK = """
import json, sys, threading, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import score
from batching import Batcher

score.TIMEOUT_MS = 500
score.batcher = Batcher(lambda texts, params: time.sleep(float(texts[0])) or ["done"] * len(texts), 0).start()
out = {}
def call(name, question):
    response = score.run([question])
    out[name] = [response.status_code, response.get_data(as_text=True), response.headers.get("x-ms-run-function-failed")] \\
        if hasattr(response, "status_code") else response
slow = threading.Thread(target=call, args=("slow", "2.0"))  # on a thread of its own, as gunicorn's threads run it
started = time.monotonic()
slow.start(); slow.join()
out["slow_s"] = time.monotonic() - started
time.sleep(1.8)  # the slow call ends; the worker answers again
call("next", "0")
print(json.dumps(out))
"""


def test_the_script_times_out_a_request_on_a_workers_thread_as_azmlinfsrv_does(fine_tuned_model, tmp_path):
    # azmlinfsrv's own timeout is a signal, which a threaded worker's request threads never get: score.py's is.
    from serving.local_endpoint import AZMLINFSRV_VENV, SCORE_SCRIPT, stage_model

    env = {"AZUREML_MODEL_DIR": str(stage_model(fine_tuned_model, tmp_path)), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([AZMLINFSRV_VENV / "bin" / "python", "-c", TIMEOUT_CHECK, SCORE_SCRIPT.parent],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.splitlines()[-1])
    status, body, failed_header = out["slow"]
    assert (status, json.loads(body), failed_header) == (500, {"message": "Scoring timeout after 500 ms"}, "True")
    assert 0.5 <= out["slow_s"] < 1.5  # given up at the limit, not when the model call ended
    assert out["next"] == ["done"]
