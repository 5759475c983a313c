"""The two forms of the fine-tuned model a job writes, and how each is served.

One description for every place that needs one: deploy_model.py (the job output it registers, the
name suffix, the deployment's concurrency and probes), the local endpoint (the folder of a local
run), evaluate_chat.py (how many questions to send at once) and the benchmarks.

A Standard_E4s_v3 deployment runs azmlinfsrv with one worker. Azure admits up to
2 x max_concurrent_requests requests at once (more get 429, which the flow retries) and the one
worker answers them in turn, so the last admitted one waits for all the others: that wait must stay
under the 180 s request limit. The probes wait initial_delay_s, then allow failure_threshold misses
PROBE_PERIOD_S apart, for the model to load (docs/azure-runtime.md, "The deployment, per form").
"""

from dataclasses import dataclass

PROBE_PERIOD_S = 10


@dataclass(frozen=True)
class Form:
    name: str
    job_output: str  # the job's mlflow_model output that holds it
    name_suffix: str  # after AZURE_MODEL_NAME when registered
    local_folder: str  # outputs/models/<run>/<local_folder> of a local run
    max_concurrent_requests: int
    initial_delay_s: int
    failure_threshold: int


FORMS = {
    # ~14 s per 128-token answer (BENCHMARKS.md): 6 admitted, the last answered within ~85 s.
    "int4": Form("int4", "quantized_model_output", "-int4", "model-int4",
                 max_concurrent_requests=3, initial_delay_s=30, failure_threshold=30),
    # ~70 s per answer in bf16: 2 admitted, the second answered within ~140 s; 3 (the tutorial's) let
    # the third wait 210 s, past the limit.
    "transformers": Form("transformers", "model_output", "", "model",
                         max_concurrent_requests=1, initial_delay_s=120, failure_threshold=60),
}
