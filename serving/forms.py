"""The two forms of the fine-tuned model a job writes, and how each is served.

One description for every place that needs one: deploy_model.py (the job output it registers, the
name suffix, the deployment's concurrency, worker and probes), the local endpoint (the folder of a
local run, the worker's threads), evaluate_chat.py (how many questions to send at once) and the
benchmarks.

A Standard_E4s_v3 deployment runs azmlinfsrv with one worker. Azure admits up to
2 x max_concurrent_requests requests at once (more get 429, which the flow retries); none may wait
past the 180 s request limit. The int4 form is served by serving/scoring/score.py in a threaded
worker, which answers requests that arrive together in one batch; the transformers form by Azure's
own scoring script in a sync worker, one request at a time. The probes wait initial_delay_s, then
allow failure_threshold misses PROBE_PERIOD_S apart, for the model to load (docs/azure-runtime.md,
"The deployment, per form", has the measurements behind each figure).
"""

from dataclasses import dataclass

from serving import REQUEST_TIMEOUT_MS

PROBE_PERIOD_S = 10
# What Azure's generated scoring script for MLflow models (the transformers form's, deployed without code)
# imports beyond the model's own packages, import: requirement. azureml.ai.monitoring, unconditionally since
# May 2026 (Azure/azureml-examples PRs #3904, #3923, #4008, #4022, #4031); the model's requirements carry it
# (finetuning_dir/fine_tune.py), or the deployment fails at boot.
AZURE_MLFLOW_SCORING_IMPORTS = {"azureml.ai.monitoring": "azureml-ai-monitoring"}


@dataclass(frozen=True)
class Form:
    name: str
    job_output: str  # the job's mlflow_model output that holds it
    name_suffix: str  # after AZURE_MODEL_NAME when registered
    local_folder: str  # outputs/models/<run>/<local_folder> of a local run
    max_concurrent_requests: int
    initial_delay_s: int
    failure_threshold: int
    batched: bool  # served by serving/scoring/score.py, which batches the requests that arrive together

    @property
    def admitted(self) -> int:
        """The requests Azure lets into the instance at once (429 for more)."""
        return 2 * self.max_concurrent_requests

    @property
    def questions_at_once(self) -> int:
        """How many questions a client does best to send at once: all that are admitted if they are answered
        together, else as many as the deployment serves (the rest would only wait longer)."""
        return self.admitted if self.batched else self.max_concurrent_requests


FORMS = {
    # 6 admitted, answered together: the slowest of 6 at once within 43.4 s on 2 vCPUs, so a request that just
    # missed a batch waits 87 s at most (BENCHMARKS.md section 8).
    "int4": Form("int4", "quantized_model_output", "-int4", "model-int4",
                 max_concurrent_requests=3, initial_delay_s=30, failure_threshold=30, batched=True),
    # ~70 s per answer in bf16: 2 admitted, the second answered within ~140 s; 3 (the tutorial's) let
    # the third wait 210 s, past the limit.
    "transformers": Form("transformers", "model_output", "", "model",
                         max_concurrent_requests=1, initial_delay_s=120, failure_threshold=60, batched=False),
}


# Threads kept free for Azure's liveness and readiness probes while every admitted request waits on one:
# with none free, a probe waits for an answer to end (36.6 s with 6 admitted; BENCHMARKS.md section 8).
PROBE_THREADS = 2


def worker_threads(form: Form) -> int:
    """The threads of the one azmlinfsrv worker: one for each admitted request, and the probes'."""
    return form.admitted + PROBE_THREADS


def scoring_env(form: Form, threads: int | None = None) -> dict:
    """The environment serving/scoring/score.py runs in for `form`: worker_threads (or `threads`), so that
    requests that arrive together are answered together, and the request limit, which the script enforces on
    those threads."""
    return {"GUNICORN_CMD_ARGS": f"--threads {threads or worker_threads(form)}",
            "SCORING_TIMEOUT_MS": str(REQUEST_TIMEOUT_MS)}
