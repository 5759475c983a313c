"""Step 3: deploy the fine-tuned model to an Azure ML managed online endpoint (or, with --local, here).

As the tutorial: register the job's model (its int4 form by default, or --form transformers),
create the endpoint AZURE_ENDPOINT_NAME, its deployment AZURE_DEPLOYMENT_NAME on one
Standard_E4s_v3, send it all traffic, and write its scoring URI and key to .env for the Prompt
flow. A pre-flight checks the quota first; whatever way it ends, the script says what still bills
and how to delete it (docs/azure-runtime.md).

    python deploy_model.py                          # the job in .env's AZURE_ML_JOB_NAME
    python deploy_model.py --job-name <name>
    python deploy_model.py --delete --yes           # the endpoint stops billing
    python deploy_model.py --connect                # the flow talks to the Azure endpoint again
    python deploy_model.py --rehearsal              # the rehearsal job's model, one question, then deleted
    python deploy_model.py --local                  # serve a local run's model here
"""

import argparse
import copy
import sys
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
from azure_steps import rehearsal
from azure_steps.billing import print_endpoint_bill, print_what_still_bills, told_what_bills_if_stopped
from azure_steps.client import OPENMPI_IMAGE, azure_reason, get_ml_client, state_text, wait
from azure_steps.preflight import check_deployment_quota, check_endpoint_name
from serving import REQUEST_TIMEOUT_MS
from serving.forms import FORMS, PROBE_PERIOD_S, scoring_env

COMPUTE_INSTANCE_TYPE = "Standard_E4s_v3"
# The int4 form is served with the project's scoring script (the local endpoint's), in an environment
# of its pinned, CPU-only requirements (docs/azure-runtime.md, "The deployment, per form").
SCORING_DIR = config.ROOT / "serving" / "scoring"
SERVING_IMAGE = OPENMPI_IMAGE
SERVING_ENV_NAME = "finetune-phi-int4-serving"
DEPLOY_SETTINGS = ("AZURE_MANAGED_IDENTITY_CLIENT_ID", "AZURE_MANAGED_IDENTITY_RESOURCE_ID", "AZURE_MODEL_NAME",
                   "AZURE_ENDPOINT_NAME", "AZURE_DEPLOYMENT_NAME")


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


def check_job(ml_client, job_name, form):
    """Stop with one line unless the fine-tuning job exists, completed and wrote the model's `form`."""
    try:
        job = ml_client.jobs.get(job_name)
    except ResourceNotFoundError:
        sys.exit(f"deploy_model.py: no job named '{job_name}' in this workspace; check --job-name")
    if state_text(job.status) != "Completed":
        sys.exit(f"deploy_model.py: job {job_name} is {state_text(job.status)}, not Completed; wait for it (or fix and re-run "
                 f"setup_ml.py); see {job.studio_url}")
    output = FORMS[form].job_output
    if output not in (job.outputs or {}):
        sys.exit(f"deploy_model.py: job {job_name} has no output '{output}' (it ran with --no-int4, or before the int4 "
                 "form existed); deploy its transformers model with --form transformers, or re-run setup_ml.py")


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
        try:
            return wait(ml_client.online_endpoints.begin_create_or_update(endpoint), "endpoint")
        except HttpResponseError as e:  # endpoint names are unique per region, across workspaces
            sys.exit(f"deploy_model.py: endpoint {endpoint_name} could not be created: {azure_reason(e)}; if the "
                     "name is taken in this region, set another AZURE_ENDPOINT_NAME in .env")
    return wait(ml_client.online_endpoints.begin_create_or_update(endpoint), "endpoint")


def int4_serving():
    """The scoring script and environment the int4 form is served with (see SCORING_DIR)."""
    code = CodeConfiguration(code=str(SCORING_DIR), scoring_script="score.py")
    environment = Environment(name=SERVING_ENV_NAME, image=SERVING_IMAGE, conda_file=str(SCORING_DIR.parent / "conda.yml"))
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


def delete_if_failed(ml_client, deployment):
    """A Failed deployment is not updated in place: delete it, so that it is created anew."""
    try:
        existing = ml_client.online_deployments.get(deployment.name, deployment.endpoint_name)
    except ResourceNotFoundError:
        return
    if state_text(existing.provisioning_state).lower() == "failed":
        print(f"Deployment {deployment.name} is Failed from an earlier try; deleting it to create it anew...")
        wait(ml_client.online_deployments.begin_delete(deployment.name, deployment.endpoint_name), "delete")


def create_or_update_deployment(ml_client, deployment):
    """Create or update the deployment; on failure print its logs, and stop."""
    delete_if_failed(ml_client, deployment)
    print(f"Deploying {deployment.name} to {deployment.endpoint_name} on {deployment.instance_type}; "
          "this takes 15-30 minutes for Phi-3.5-mini...")
    try:
        return wait(ml_client.online_deployments.begin_create_or_update(deployment), "deployment")
    except HttpResponseError as e:
        try:
            logs = ml_client.online_deployments.get_logs(deployment.name, deployment.endpoint_name, lines=100)
        except HttpResponseError as no_logs:
            logs = f"(its logs could not be fetched: {no_logs})"
        print(f"--- last lines of {deployment.name}'s logs ---\n{logs}\n---", file=sys.stderr)
        sys.exit(f"deploy_model.py: deployment {deployment.name} failed: {azure_reason(e)}")


def set_traffic_to_deployment(ml_client, endpoint_name, deployment_name):
    """Send all traffic to the deployment."""
    endpoint = ml_client.online_endpoints.get(name=endpoint_name)
    print(f"Current traffic allocation: {endpoint.traffic}")
    endpoint.traffic = {deployment_name: 100}
    updated = wait(ml_client.online_endpoints.begin_create_or_update(endpoint), "traffic")
    print(f"Updated traffic allocation: {updated.traffic}")
    return updated


def save_endpoint_settings(ml_client, endpoint_name, form):
    """Write the scoring URI and primary key into .env for the Prompt flow, and the form for step 5."""
    try:
        scoring_uri = ml_client.online_endpoints.get(name=endpoint_name).scoring_uri
    except ResourceNotFoundError:
        sys.exit(f"deploy_model.py: no endpoint named '{endpoint_name}' in this workspace; deploy one first with "
                 "`python deploy_model.py`, or check AZURE_ENDPOINT_NAME")
    key = ml_client.online_endpoints.get_keys(name=endpoint_name).primary_key
    path = config.save_settings(AZURE_ML_ENDPOINT=scoring_uri, AZURE_ML_API_KEY=key, AZURE_ML_ENDPOINT_FORM=form)
    print(f"Scoring URI: {scoring_uri}\nWrote AZURE_ML_ENDPOINT, AZURE_ML_API_KEY and AZURE_ML_ENDPOINT_FORM to {path}")


def delete_endpoint(ml_client, endpoint_name):
    """Delete the endpoint and its deployments: it stops costing money."""
    try:
        ml_client.online_endpoints.get(name=endpoint_name)
    except ResourceNotFoundError:
        print(f"Endpoint {endpoint_name} does not exist; nothing to delete.")
        return
    print(f"Deleting endpoint {endpoint_name} and its deployments...")
    wait(ml_client.online_endpoints.begin_delete(name=endpoint_name), "delete")
    print(f"Deleted endpoint {endpoint_name}.")


def delete_command(is_rehearsal: bool) -> str:
    return "python deploy_model.py" + (" --rehearsal" if is_rehearsal else "") + " --delete --yes"


def main(argv=None):
    args = parse_args(argv)
    if args.local:
        from serving.local_endpoint import serve_local

        return serve_local(args.model_dir, args.port, folder=FORMS[args.form].local_folder)
    if args.connect:
        return save_endpoint_settings(get_ml_client("AZURE_ENDPOINT_NAME"), config.AZURE_ENDPOINT_NAME, args.form)
    if args.delete:
        ml_client = get_ml_client("AZURE_ENDPOINT_NAME")
        name = rehearsal.endpoint_name(config.AZURE_ENDPOINT_NAME) if args.rehearsal else config.AZURE_ENDPOINT_NAME
        return delete_endpoint(ml_client, name) if confirm_delete(args, name) else None
    job_name = args.job_name or (config.AZURE_ML_REHEARSAL_JOB_NAME if args.rehearsal else config.AZURE_ML_JOB_NAME)
    if not job_name:
        sys.exit(f"deploy_model.py: no job to deploy: run `python setup_ml.py{' --rehearsal' * args.rehearsal}` "
                 "first (it records the job in .env) or pass --job-name")
    ml_client = get_ml_client(*DEPLOY_SETTINGS)
    check_endpoint_name(config.AZURE_ENDPOINT_NAME)
    endpoint_name, deployment_name, model_name = (
        config.AZURE_ENDPOINT_NAME, config.AZURE_DEPLOYMENT_NAME, config.AZURE_MODEL_NAME
    )
    if args.rehearsal:  # its own model name, endpoint and deployment, beside the real ones
        endpoint_name, deployment_name = rehearsal.endpoint_name(endpoint_name), rehearsal.DEPLOYMENT_NAME
        model_name += "-rehearsal"
    instance_type = args.instance_type or (rehearsal.DEPLOYMENT_SIZE if args.rehearsal else COMPUTE_INSTANCE_TYPE)
    check_job(ml_client, job_name, args.form)
    # The pre-flight: everything is checked before anything is registered, created or billed.
    check_deployment_quota(ml_client, build_deployment(endpoint_name, deployment_name, None, args.form, instance_type))

    registered_model = register_model(ml_client, model_name, job_name, args.form)
    with told_what_bills_if_stopped(ml_client, endpoint_name, delete_command(args.rehearsal)):
        create_or_update_endpoint(ml_client, endpoint_name, "Endpoint for finetuned Phi-3 model")
        deployment = build_deployment(endpoint_name, deployment_name, registered_model.id, args.form, instance_type)
        create_or_update_deployment(ml_client, deployment)
        set_traffic_to_deployment(ml_client, endpoint_name, deployment_name)
        answer = rehearsal.ask(ml_client, endpoint_name) if args.rehearsal else None
    if args.rehearsal and not args.keep:
        print(f"\nThe rehearsal passed; its endpoint is no longer needed, and its cluster, {rehearsal.CLUSTER_NAME}, "
              "scales to 0 by itself. Next: python setup_ml.py (the A100 job).")
        delete_endpoint(ml_client, endpoint_name)
    elif args.rehearsal:
        print(f"\nThe rehearsal passed. --keep: endpoint {endpoint_name} stays up.")
        print_what_still_bills(ml_client, endpoint_name, delete_command(True))
    else:
        save_endpoint_settings(ml_client, endpoint_name, args.form)
        print_endpoint_bill(ml_client, endpoint_name, delete_command(False))
    return answer


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job-name", default=None, help="the job whose model to deploy (default: AZURE_ML_JOB_NAME)")
    parser.add_argument("--form", choices=sorted(FORMS), default="int4",
                        help="the model's form to serve: int4 (ONNX, faster on CPUs) or transformers (default: int4)")
    parser.add_argument("--instance-type", default=None, help=f"the deployment's VM size (default: "
                        f"{COMPUTE_INSTANCE_TYPE}; {rehearsal.DEPLOYMENT_SIZE} with --rehearsal)")
    parser.add_argument("--delete", action="store_true", help="delete the endpoint and its deployments")
    parser.add_argument("--rehearsal", action="store_true", help="deploy the rehearsal job's model to its own "
                        "endpoint, ask it one question through the flow, then delete it")
    parser.add_argument("--keep", action="store_true", help="with --rehearsal: keep its endpoint after the question")
    parser.add_argument("--yes", action="store_true", help="confirm --delete without asking")
    parser.add_argument("--connect", action="store_true", help="only write the live endpoint's URI and key into .env")
    parser.add_argument("--local", action="store_true", help="serve a local model at http://127.0.0.1:PORT/score")
    parser.add_argument("--model-dir", type=Path, default=None, help="with --local: the MLflow model folder "
                        "(default: the newest outputs/models/<run>/model-int4, or .../model)")
    parser.add_argument("--port", type=int, default=5001, help="with --local: the port to serve on (default: 5001)")
    return parser.parse_args(argv)


def confirm_delete(args, endpoint_name) -> bool:
    if args.yes:
        return True
    if not sys.stdin.isatty():
        sys.exit("deploy_model.py: --delete needs --yes to confirm when not run from a terminal")
    answer = input(f"Delete endpoint {endpoint_name} and all its deployments? [y/N] ")
    return answer.strip().lower() in ("y", "yes")


if __name__ == "__main__":
    main()
