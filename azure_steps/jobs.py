"""How an Azure ML job ended, told in one line: Completed, Failed with Azure's error, Canceled, or
still running (and billing) after Ctrl-C stopped only the streaming of its logs.

azure-ai-ml's `jobs.stream` raises JobException for a Failed job (Azure's error as JSON in its text)
and for Ctrl-C (the job runs on); every other end state returns quietly, so the status is asked
afterwards (docs/azure-runtime.md, "How a job ends").
"""

import json
import sys

from azure.ai.ml.exceptions import JobException
from azure.core.exceptions import ResourceNotFoundError

from azure_steps.client import state_text
from azure_steps.prices import cost_for, cost_per_hour

# Why a job ends in each state other than Completed and Failed (Azure ML's job states).
ENDED_BECAUSE = {
    "Canceled": "its time limit passed, or it was canceled (in the studio or with --cancel)",
    "CancelRequested": "it is being canceled (its time limit passed, or it was canceled)",
    "NotResponding": "Azure lost contact with its node",
}


def cancel_command(job_name: str) -> str:
    return f"python setup_ml.py --cancel {job_name}"


def azure_error(error: JobException) -> str:
    """'code: message' of the error azure-ai-ml puts, as JSON, into a Failed job's JobException."""
    text = str(error).strip().removeprefix("Exception :").strip()
    try:
        details = json.loads(text)
    except ValueError:
        return next((line.strip() for line in text.splitlines() if line.strip()), type(error).__name__)
    if isinstance(details, dict):
        details = details.get("error") or details
        # Azure's message for a user error carries the traceback: its first and last lines say it in one.
        lines = [line.strip() for line in (details.get("message") or "").splitlines() if line.strip()]
        message = lines[0] + (f" ... {lines[-1]}" if len(lines) > 1 else "") if lines else None
        return ": ".join(part for part in (details.get("code"), message) if part) or text
    return str(details)


def stream_to_the_end(ml_client, job, size: str, nodes: int, max_hours: float | None) -> None:
    """Stream the job's logs; stop with one line, non-zero, unless it ends Completed."""
    try:
        ml_client.jobs.stream(job.name)  # Stream the job logs
    except JobException as e:
        if isinstance(e.__cause__, KeyboardInterrupt):
            limit = f"until it ends or its time limit ({max_hours:g} h) passes, at most " \
                    f"{cost_for(size, max_hours, nodes)}" if max_hours else "until it ends"
            print(f"\nsetup_ml.py: stopped streaming, but job {job.name} still runs on Azure and bills "
                  f"{cost_per_hour(size, nodes)} {limit}.\nCancel it: {cancel_command(job.name)}   (follow it: "
                  f"{job.studio_url})", file=sys.stderr)
            sys.exit(130)
        sys.exit(f"setup_ml.py: job {job.name} failed: {azure_error(e)}; see its logs at {job.studio_url}")
    status = state_text(ml_client.jobs.get(job.name).status)
    if status != "Completed":
        why = ENDED_BECAUSE.get(status, "it did not complete")
        sys.exit(f"setup_ml.py: job {job.name} ended {status}, not Completed: {why}; see {job.studio_url}")


def cancel(ml_client, job_name: str) -> None:
    """Cancel a job: its nodes stop billing once it has stopped."""
    print(f"Canceling job {job_name}...")
    try:
        ml_client.jobs.begin_cancel(job_name).result()
    except ResourceNotFoundError:
        sys.exit(f"setup_ml.py: no job named '{job_name}' in this workspace; check the name in the studio (Jobs)")
    print(f"Canceled job {job_name}.")
