"""Step 3: deploy the fine-tuned model to an Azure ML managed online endpoint (or, with --local, here).

On Azure, this first checks, before anything is registered or created, that the deployment's VM
family has the vCPU quota it takes in the workspace's region (instances plus Azure's 20% reserve);
then it:
  1. registers the job's int4 form of the model, `quantized_model_output` (an MLflow model), as
     AZURE_MODEL_NAME-int4, or with --form transformers its `model_output` as AZURE_MODEL_NAME;
  2. creates the managed online endpoint AZURE_ENDPOINT_NAME with the user-assigned identity,
     or updates it in place when it exists (it keeps serving: nothing is deleted);
  3. creates or updates the deployment AZURE_DEPLOYMENT_NAME on one Standard_E4s_v3;
  4. sends it 100% of the traffic;
  5. writes the scoring URI and primary key to .env (AZURE_ML_ENDPOINT, AZURE_ML_API_KEY), where
     the Prompt flow reads them.
The job is the one setup_ml.py recorded in .env (AZURE_ML_JOB_NAME) unless --job-name names another.

An endpoint costs money while it exists, even idle: `--delete --yes` removes it. A deployment that
fails prints what is still in the workspace, its price an hour, and that command; `python
billing.py` lists everything in the workspace that bills now.

`--connect` only writes a live endpoint's scoring URI and key into .env: switching the Prompt flow
back to Azure after `--local` needs no redeploy.

The int4 form is the default: on the deployment's 4 vCPUs it answers several times faster than the
bf16 transformers model, at the same test loss within a few tenths of a percent (BENCHMARKS.md).

`--rehearsal` deploys the int4 model of the rehearsal job (`setup_ml.py --rehearsal`, recorded in
.env as AZURE_ML_REHEARSAL_JOB_NAME) to its own endpoint, AZURE_ENDPOINT_NAME's first 22 characters
plus -rehearsal, on the smallest size managed endpoints offer (Standard_DS1_v2), asks it one question
through the Prompt flow, and deletes that endpoint once answered (`--keep` keeps it). .env is left
as it was.

`--local` serves a locally fine-tuned model (default: the newest outputs/models/<run>/model-int4,
or .../model with --form transformers) at http://127.0.0.1:PORT/score with the managed
endpoint's scoring contract.

    python deploy_model.py
    python deploy_model.py --job-name <name>
    python deploy_model.py --delete --yes
    python deploy_model.py --connect                # the flow talks to the Azure endpoint again
    python deploy_model.py --local
    python deploy_model.py --rehearsal                # deletes its endpoint once its question is answered
"""

import argparse
import copy
import logging
import re
import sys
import time
from pathlib import Path

from azure.ai.ml.constants import AssetTypes
from azure.ai.ml.entities import (
    CodeConfiguration,
    Environment,
    IdentityConfiguration,
    ManagedIdentityConfiguration,
    ManagedOnlineDeployment,
    ManagedOnlineEndpoint,
    Model,
    OnlineRequestSettings,
    ProbeSettings,
)
from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

import config
from config import ROOT
from billing import deployment_rows
from ml_client import OPENMPI_IMAGE, get_ml_client
from preflight import check_quota, deployment_vcpus, size_facts, workspace_location
from prices import cost_per_day, cost_per_hour
from serving import REQUEST_TIMEOUT_MS
from serving.forms import FORMS, PROBE_PERIOD_S, scoring_env

COMPUTE_INSTANCE_TYPE = "Standard_E4s_v3"
# The int4 form is an MLflow pyfunc model, for which Azure's own scoring expects the pandas split
# form, not the list of questions the flow sends: it is deployed with the project's scoring script
# (the local endpoint's), in an environment of its pinned, CPU-only requirements.
SCORING_DIR = ROOT / "serving" / "scoring"
SERVING_IMAGE = OPENMPI_IMAGE
SERVING_ENV_NAME = "finetune-phi-int4-serving"
PROGRESS_EVERY_S = 30
# Azure's rule for endpoint names (learn.microsoft.com/azure/machine-learning/how-to-manage-quotas, "Azure
# Machine Learning online endpoints and batch endpoints"): begin with a letter, 3-32 characters, letters
# and numbers, single dashes accepted.
ENDPOINT_NAME = re.compile(r"[A-Za-z](?!.*--)[A-Za-z0-9-]{2,31}")
REHEARSAL_INSTANCE_TYPE = "Standard_DS1_v2"  # the smallest size managed online endpoints offer
REHEARSAL_QUESTION = "Who founded Microsoft?"
DEPLOY_SETTINGS = (
    "AZURE_MANAGED_IDENTITY_CLIENT_ID",
    "AZURE_MANAGED_IDENTITY_RESOURCE_ID",
    "AZURE_MODEL_NAME",
    "AZURE_ENDPOINT_NAME",
    "AZURE_DEPLOYMENT_NAME",
)

logger = logging.getLogger("deploy_model")


def deployment_env_vars(form="transformers"):
    env = {
        "SUBSCRIPTION_ID": config.AZURE_SUBSCRIPTION_ID,
        "RESOURCE_GROUP_NAME": config.AZURE_RESOURCE_GROUP_NAME,
        "UAI_CLIENT_ID": config.AZURE_MANAGED_IDENTITY_CLIENT_ID,
        "WORKER_COUNT": "1",  # azmlinfsrv's default, stated: FORMS' concurrency assumes it
    }
    if FORMS[form].batched:  # this project's scoring script: see serving/forms.py
        env.update(scoring_env(FORMS[form]))
    return env


def wait_with_progress(poller, what: str):
    """Wait for a long-running Azure operation, printing the elapsed time as it goes."""
    started = time.monotonic()
    while not poller.done():
        poller.wait(timeout=PROGRESS_EVERY_S)
        if not poller.done():
            print(f"  {what}: still running after {int(time.monotonic() - started)} s...", flush=True)
    return poller.result()


def check_job(ml_client, job_name, form):
    """Stop with one line unless the fine-tuning job exists, completed and wrote the model's `form`."""
    try:
        job = ml_client.jobs.get(job_name)
    except ResourceNotFoundError:
        sys.exit(f"deploy_model.py: no job named '{job_name}' in this workspace; check --job-name")
    if job.status != "Completed":
        sys.exit(
            f"deploy_model.py: job {job_name} is {job.status}, not Completed; wait for it "
            f"(or fix and re-run setup_ml.py); see {job.studio_url}"
        )
    output = FORMS[form].job_output
    if output not in (job.outputs or {}):
        sys.exit(
            f"deploy_model.py: job {job_name} has no output '{output}' (it ran with --no-int4, or before the int4 "
            "form existed); deploy its transformers model with --form transformers, or re-run setup_ml.py"
        )


def register_model(ml_client, model_name, job_name, form="transformers"):
    """Register the job's MLflow model output of the given form."""
    output, suffix = FORMS[form].job_output, FORMS[form].name_suffix
    model_path = f"azureml://jobs/{job_name}/outputs/{output}"
    print(f"Registering model {model_name + suffix} from job {job_name} at path {model_path}.")
    run_model = Model(
        path=model_path,
        name=model_name + suffix,
        description="Model created from run." if form == "transformers" else f"The {form} ONNX form of the model "
                    f"fine-tuned by job {job_name} (onnxruntime-genai), for CPU endpoints.",
        type=AssetTypes.MLFLOW_MODEL,
    )
    model = ml_client.models.create_or_update(run_model)
    print(f"Registered model ID: {model.id}")
    return model


def create_or_update_endpoint(ml_client, endpoint_name, description=""):
    """Create the endpoint, or update it in place when it exists (it keeps serving its traffic)."""
    endpoint = ManagedOnlineEndpoint(
        name=endpoint_name,
        description=description,
        auth_mode="key",
        identity=IdentityConfiguration(
            type="user_assigned",
            user_assigned_identities=[
                ManagedIdentityConfiguration(resource_id=config.AZURE_MANAGED_IDENTITY_RESOURCE_ID)
            ],
        ),
    )
    try:
        existing = ml_client.online_endpoints.get(name=endpoint_name)
        endpoint.traffic = existing.traffic  # keep the live deployment serving while we update
        print(f"Endpoint {endpoint_name} exists; updating it in place.")
    except ResourceNotFoundError:
        print(f"Creating endpoint {endpoint_name}; this takes a few minutes...")
    return wait_with_progress(ml_client.online_endpoints.begin_create_or_update(endpoint), "endpoint")


def int4_serving():
    """The scoring script and environment the int4 form is served with (see SCORING_DIR)."""
    code = CodeConfiguration(code=str(SCORING_DIR), scoring_script="score.py")
    environment = Environment(name=SERVING_ENV_NAME, image=SERVING_IMAGE, conda_file=str(ROOT / "serving" / "conda.yml"))
    return code, environment


def build_deployment(endpoint_name, deployment_name, model_id, form="transformers", instance_type=COMPUTE_INSTANCE_TYPE):
    """The deployment: one CPU instance, probes and concurrency fitted to the form (serving/forms.py)."""
    serving = FORMS[form]
    probe = ProbeSettings(failure_threshold=serving.failure_threshold, success_threshold=1, period=PROBE_PERIOD_S,
                          initial_delay=serving.initial_delay_s)
    code, environment = int4_serving() if form == "int4" else (None, None)  # transformers: Azure's own scoring
    return ManagedOnlineDeployment(
        name=deployment_name,
        endpoint_name=endpoint_name,
        model=model_id,
        code_configuration=code,
        environment=environment,
        instance_type=instance_type,
        instance_count=1,
        environment_variables=deployment_env_vars(form),
        request_settings=OnlineRequestSettings(
            max_concurrent_requests_per_instance=serving.max_concurrent_requests,
            request_timeout_ms=REQUEST_TIMEOUT_MS,
        ),
        liveness_probe=probe,
        readiness_probe=copy.deepcopy(probe),
    )


def check_deployment_quota(ml_client, deployment):
    """Pre-flight: stop with one line unless the deployment's VM family has the vCPUs it takes, with the reserve."""
    location = workspace_location(ml_client, config.AZURE_ML_WORKSPACE_NAME)
    facts = size_facts(ml_client, deployment.instance_type, location)
    held = 0  # an update in place of a deployment of the same size needs no more than it holds
    try:
        existing = ml_client.online_deployments.get(deployment.name, deployment.endpoint_name)
        if (existing.instance_type or "").lower() == deployment.instance_type.lower():
            held = deployment_vcpus(existing.instance_count or 0, facts)
    except ResourceNotFoundError:
        pass
    check_quota(ml_client, location, facts, deployment_vcpus(deployment.instance_count, facts) - held,
                f"deployment {deployment.name} ({deployment.instance_count} x {deployment.instance_type} and Azure's "
                "20% reserve)", "deploy_model.py")


def create_or_update_deployment(ml_client, deployment, delete_command):
    """Create or update the deployment; on failure print its logs and what still bills, and stop."""
    print(f"Deploying {deployment.name} to {deployment.endpoint_name} on {deployment.instance_type}; "
          "this takes 15-30 minutes for Phi-3.5-mini...")
    try:
        return wait_with_progress(ml_client.online_deployments.begin_create_or_update(deployment), "deployment")
    except HttpResponseError as e:
        print_deployment_logs(ml_client, deployment)
        print_what_still_bills(ml_client, deployment.endpoint_name, delete_command)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.exit(f"deploy_model.py: deployment {deployment.name} failed: {reason}")


def print_what_still_bills(ml_client, endpoint_name, delete_command):
    """What the failed or kept endpoint still holds, each with its price an hour, and the command that removes it."""
    try:
        rows = deployment_rows(ml_client, endpoint_name)
    except HttpResponseError as e:
        rows = [(f"endpoint {endpoint_name} (its deployments could not be listed: {str(e).strip()[:120]})", None)]
    print("Still in the workspace, billing until deleted:\n" + "".join(f"  {text}\n" for text, _ in rows)
          + f"Remove it: {delete_command}", flush=True)


def print_deployment_logs(ml_client, deployment):
    try:
        logs = ml_client.online_deployments.get_logs(deployment.name, deployment.endpoint_name, lines=100)
    except HttpResponseError as e:
        logs = f"(its logs could not be fetched: {e})"
    print(f"--- last lines of {deployment.name}'s logs ---\n{logs}\n---", file=sys.stderr)


def set_traffic_to_deployment(ml_client, endpoint_name, deployment_name):
    """Send all traffic to the deployment."""
    endpoint = ml_client.online_endpoints.get(name=endpoint_name)
    print(f"Current traffic allocation: {endpoint.traffic}")
    endpoint.traffic = {deployment_name: 100}
    updated = wait_with_progress(ml_client.online_endpoints.begin_create_or_update(endpoint), "traffic")
    print(f"Updated traffic allocation: {updated.traffic}")
    return updated


def save_endpoint_settings(ml_client, endpoint_name):
    """Write the scoring URI and primary key into .env for the Prompt flow."""
    try:
        scoring_uri = ml_client.online_endpoints.get(name=endpoint_name).scoring_uri
    except ResourceNotFoundError:
        sys.exit(f"deploy_model.py: no endpoint named '{endpoint_name}' in this workspace; deploy one first with "
                 "`python deploy_model.py`, or check AZURE_ENDPOINT_NAME")
    key = ml_client.online_endpoints.get_keys(name=endpoint_name).primary_key
    path = config.save_settings(AZURE_ML_ENDPOINT=scoring_uri, AZURE_ML_API_KEY=key)
    print(f"Scoring URI: {scoring_uri}\nWrote AZURE_ML_ENDPOINT and AZURE_ML_API_KEY to {path}")


def delete_endpoint(ml_client, endpoint_name):
    """Delete the endpoint and its deployments: it stops costing money."""
    try:
        ml_client.online_endpoints.get(name=endpoint_name)
    except ResourceNotFoundError:
        print(f"Endpoint {endpoint_name} does not exist; nothing to delete.")
        return
    print(f"Deleting endpoint {endpoint_name} and its deployments...")
    wait_with_progress(ml_client.online_endpoints.begin_delete(name=endpoint_name), "delete")
    print(f"Deleted endpoint {endpoint_name}.")


def check_endpoint_name(name):
    if not ENDPOINT_NAME.fullmatch(name):
        sys.exit(
            f"deploy_model.py: AZURE_ENDPOINT_NAME '{name}' is not a valid endpoint name: use 3-32 letters, "
            "digits and single hyphens, starting with a letter (e.g. finetune-phi-endpoint)"
        )


def rehearsal_endpoint_name(endpoint_name: str) -> str:
    """The rehearsal's own endpoint, beside the real one: within 32 characters, no double hyphen."""
    return endpoint_name[:22].rstrip("-") + "-rehearsal"


def delete_command(rehearsal: bool) -> str:
    return "python deploy_model.py" + (" --rehearsal" if rehearsal else "") + " --delete --yes"


def deploy(job_name, form, rehearsal=False, instance_type=None, keep=False):
    if not job_name:
        step = "setup_ml.py --rehearsal" if rehearsal else "setup_ml.py"
        sys.exit(f"deploy_model.py: no job to deploy: run `python {step}` first (it records the job in .env) "
                 "or pass --job-name")
    ml_client = get_ml_client(*DEPLOY_SETTINGS)
    check_endpoint_name(config.AZURE_ENDPOINT_NAME)
    endpoint_name, deployment_name, model_name = (
        config.AZURE_ENDPOINT_NAME, config.AZURE_DEPLOYMENT_NAME, config.AZURE_MODEL_NAME
    )
    if rehearsal:  # its own model name, endpoint and deployment, beside the real ones
        endpoint_name, deployment_name = rehearsal_endpoint_name(endpoint_name), "rehearsal"
        model_name += "-rehearsal"
    instance_type = instance_type or (REHEARSAL_INSTANCE_TYPE if rehearsal else COMPUTE_INSTANCE_TYPE)
    check_job(ml_client, job_name, form)
    # Everything is checked before anything is registered, created or billed.
    check_deployment_quota(ml_client, build_deployment(endpoint_name, deployment_name, None, form, instance_type))
    model = register_model(ml_client, model_name, job_name, form)
    create_or_update_endpoint(ml_client, endpoint_name, "Endpoint for finetuned Phi-3 model")
    deployment = build_deployment(endpoint_name, deployment_name, model.id, form, instance_type)
    create_or_update_deployment(ml_client, deployment, delete_command(rehearsal))
    set_traffic_to_deployment(ml_client, endpoint_name, deployment_name)
    if rehearsal:
        return ask_the_rehearsal(ml_client, endpoint_name, keep)
    save_endpoint_settings(ml_client, endpoint_name)
    print(f"Done. Endpoint {endpoint_name} serves {deployment_name}; it bills {cost_per_hour(instance_type)}"
          f"{cost_per_day(instance_type)}, called or not, until you run `{delete_command(False)}`.")


def ask_the_rehearsal(ml_client, endpoint_name, keep=False):
    """One question through the Prompt flow to the rehearsal endpoint (.env untouched); then its endpoint is
    deleted, unless `keep`."""
    from local.ask_flow import ask_the_flow

    settings = {
        "AZURE_ML_ENDPOINT": ml_client.online_endpoints.get(name=endpoint_name).scoring_uri,
        "AZURE_ML_API_KEY": ml_client.online_endpoints.get_keys(name=endpoint_name).primary_key,
    }
    try:
        answer = ask_the_flow(REHEARSAL_QUESTION, settings)
    except SystemExit:  # kept for a look at its logs, and said so
        print_what_still_bills(ml_client, endpoint_name, delete_command(True))
        raise
    print(f"\nQ: {REHEARSAL_QUESTION}\nA (the rehearsal's tiny model, through the flow): {answer}")
    if keep:
        print(f"\nThe rehearsal passed. --keep: endpoint {endpoint_name} stays up.")
        print_what_still_bills(ml_client, endpoint_name, delete_command(True))
    else:
        print("\nThe rehearsal passed; its endpoint is no longer needed.")
        delete_endpoint(ml_client, endpoint_name)
    print("Its cluster, cpu-rehearsal, scales to 0 by itself. Next: python setup_ml.py (the A100 job).")
    return answer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job-name", default=None,
                        help="fine-tuning job whose model to deploy (default: AZURE_ML_JOB_NAME, recorded by setup_ml.py)")
    parser.add_argument("--form", choices=sorted(FORMS), default="int4",
                        help="which form of the fine-tuned model to serve: int4 (its int4 ONNX form, several times "
                             "faster on the deployment's CPUs) or transformers (the bf16 model as trained) "
                             "(default: int4)")
    parser.add_argument("--instance-type", default=None,
                        help=f"VM size of the deployment (default: {COMPUTE_INSTANCE_TYPE}, or "
                             f"{REHEARSAL_INSTANCE_TYPE} with --rehearsal)")
    parser.add_argument("--delete", action="store_true", help="delete the endpoint AZURE_ENDPOINT_NAME and its deployments "
                        "(with --rehearsal: the rehearsal's endpoint)")
    parser.add_argument("--rehearsal", action="store_true",
                        help="deploy the rehearsal job's int4 model (AZURE_ML_REHEARSAL_JOB_NAME, from setup_ml.py "
                             f"--rehearsal) to its own endpoint <AZURE_ENDPOINT_NAME>-rehearsal on a "
                             f"{REHEARSAL_INSTANCE_TYPE}, ask it one question through the flow, and print how to delete it")
    parser.add_argument("--keep", action="store_true",
                        help="with --rehearsal: keep its endpoint after the question (by default it is deleted once "
                             "answered; kept, it bills until `--rehearsal --delete --yes`)")
    parser.add_argument("--yes", action="store_true", help="confirm --delete without asking")
    parser.add_argument("--connect", action="store_true",
                        help="only write the live endpoint's scoring URI and primary key into .env (AZURE_ML_ENDPOINT, "
                             "AZURE_ML_API_KEY), e.g. to switch the Prompt flow back from --local; deploys nothing")
    parser.add_argument("--local", action="store_true",
                        help="serve a local model at http://127.0.0.1:PORT/score instead of deploying to Azure")
    parser.add_argument("--model-dir", type=Path, default=None,
                        help="with --local: the MLflow model folder (default: the newest outputs/models/<run>/model-int4, "
                             "or .../model with --form transformers)")
    parser.add_argument("--port", type=int, default=5001, help="with --local: the port to serve on (default: 5001)")
    return parser.parse_args(argv)


def confirm_delete(args, endpoint_name) -> bool:
    if args.yes:
        return True
    if not sys.stdin.isatty():
        sys.exit("deploy_model.py: --delete needs --yes to confirm when not run from a terminal")
    answer = input(f"Delete endpoint {endpoint_name} and all its deployments? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def main(argv=None):
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.WARNING)
    args = parse_args(argv)
    if args.local:
        from serving.local_endpoint import serve_local

        return serve_local(args.model_dir, args.port, folder=FORMS[args.form].local_folder)
    if args.connect:
        config.require("AZURE_ENDPOINT_NAME")
        return save_endpoint_settings(get_ml_client("AZURE_ENDPOINT_NAME"), config.AZURE_ENDPOINT_NAME)
    if args.delete:
        config.require("AZURE_ENDPOINT_NAME")
        name = rehearsal_endpoint_name(config.AZURE_ENDPOINT_NAME) if args.rehearsal else config.AZURE_ENDPOINT_NAME
        if confirm_delete(args, name):
            delete_endpoint(get_ml_client("AZURE_ENDPOINT_NAME"), name)
        return None
    if args.rehearsal:
        return deploy(args.job_name or config.AZURE_ML_REHEARSAL_JOB_NAME, args.form, True, args.instance_type,
                      keep=args.keep)
    return deploy(args.job_name or config.AZURE_ML_JOB_NAME, args.form, instance_type=args.instance_type)


if __name__ == "__main__":
    main()
