"""A stand-in of Azure Machine Learning's REST API, for the real, unpatched azure-ai-ml MLClient.

One HTTPS server on 127.0.0.1 answers for three Azure hosts, which resolve to it in the test
process (evaluation_fixtures.resolve_to_stand_in):
- Azure Resource Manager (management.azure.com): the workspace, its computes, the region's VM
  sizes and quota, environments, code and models, jobs, online endpoints and deployments, at the
  api-versions azure-ai-ml 1.35.2 sends (read from its requests: workspace and datastores
  2024-10-01-preview; computes, VM sizes, usages, models 2023-08-01-preview; code 2023-04-01;
  environments and deployments 2023-04-01-preview; jobs 2025-01-01-preview to submit,
  2024-01-01-preview to read; online endpoints and the list of deployments 2022-02-01-preview);
- the workspace's region host (eastus2.api.azureml.ms): its discovery document and the run
  history, whose run details carry a job's status, error and log files;
- the workspace's storage account (standinstore.blob.core.windows.net): the code snapshot and the
  job's local inputs, uploaded by azure-storage-blob, and the job's log file.

Bodies follow Microsoft's published examples in Azure/azure-rest-api-specs,
specification/machinelearningservices/resource-manager/Microsoft.MachineLearningServices/preview/
(named "EXAMPLES <api-version>/examples/..." at each route below: the version the SDK sends where
that folder has the example, else the nearest that has it), with this workspace's names and values
in place of the examples' placeholders ("string"), plus the fields Azure fills in that the SDK
reads. Long-running operations answer as ARM does: 201 (202 for a delete) with Azure-AsyncOperation
and x-ms-async-operation-timeout, then the operation's status (Azure/azure-resource-manager-rpc,
v1.0/async-api-reference.md): InProgress, then Succeeded, or Failed with its error; the resource then
carries that end state.

The stand-in answers at once where Azure takes minutes; what it is told (`job_statuses`,
`operation_states`, `forbidden`, ...) says how each run ends. Everything it got is in `requests`.
"""

import json
import re
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from evaluation_fixtures import Recording, StaticCredential, make_certificate, read_request, resolve_to_stand_in

TOKEN = "stand-in-arm-token"
ACCOUNT_KEY = "c3RhbmQtaW4tYWNjb3VudC1rZXk="  # the storage account's key, base64 as Azure's (listSecrets)
SUBSCRIPTION = "00000000-1111-2222-3333-444444444444"
GROUP = "finetunephi-rg"
WORKSPACE = "finetunephi-workspace"
LOCATION = "eastus2"
PROVIDER = "Microsoft.MachineLearningServices"

# The region's VM sizes, as EXAMPLES 2023-08-01-preview/examples/VirtualMachineSize/list.json lists them
# (name, family, vCPUs, gpus, memoryGB, ...); the sizes the project uses, with their families.
SIZES = [
    {"name": "Standard_DS1_v2", "family": "standardDSv2Family", "vCPUs": 1, "gpus": 0, "memoryGB": 3.5},
    {"name": "Standard_DS3_v2", "family": "standardDSv2Family", "vCPUs": 4, "gpus": 0, "memoryGB": 14.0},
    {"name": "Standard_E4s_v3", "family": "standardESv3Family", "vCPUs": 4, "gpus": 0, "memoryGB": 32.0},
    {"name": "Standard_E16s_v3", "family": "standardESv3Family", "vCPUs": 16, "gpus": 0, "memoryGB": 128.0},
    {"name": "Standard_NC24ads_A100_v4", "family": "standardNCADSA100v4Family", "vCPUs": 24, "gpus": 1,
     "memoryGB": 220.0},
]
SIZE_FIELDS = {"osVhdSizeMB": 1047552, "maxResourceVolumeMB": 65536, "lowPriorityCapable": True, "premiumIO": True,
               "supportedComputeTypes": ["AmlCompute", "ComputeInstance", "MIR"]}


def usage(family: str, used: int, limit: int, label: str | None = None) -> dict:
    """One entry of the region's quota list, as EXAMPLES 2023-08-01-preview/examples/Usage/list.json writes a
    vmFamily entry. That example writes the label in name.value too; here name.value is the family's id, the
    one the list of VM sizes gives (what the project's pre-flight matches on): only Azure can say which."""
    label = label or f"{family} Cluster Dedicated vCPUs"
    return {"id": f"/subscriptions/{SUBSCRIPTION}/usages/{family}", "type": f"{PROVIDER}/vmFamily/usages",
            "currentValue": used, "limit": limit, "name": {"value": family, "localizedValue": label}, "unit": "Count"}


def total_usage(used: int, limit: int) -> dict:
    """The region's total of dedicated vCPUs (Usage/list.json's dedicatedCores entry)."""
    return {"id": f"/subscriptions/{SUBSCRIPTION}/usages", "type": f"{PROVIDER}/dedicatedCores/usages",
            "currentValue": used, "limit": limit, "unit": "Count",
            "name": {"value": "Total Cluster Dedicated Regional vCPUs",
                     "localizedValue": "Total Cluster Dedicated Regional vCPUs"}}


USAGES = [total_usage(0, 300), usage("standardDSv2Family", 0, 24), usage("standardESv3Family", 0, 32),
          usage("standardNCADSA100v4Family", 0, 96)]


def authorization_failed(action: str, scope: str) -> dict:
    """ARM's 403 when the caller's role lacks an action (learn.microsoft.com, "Troubleshoot Azure RBAC" and
    "Resolve errors for AuthorizationFailed": code AuthorizationFailed, this message)."""
    return {"error": {"code": "AuthorizationFailed", "message": (
        "The client 'learner@contoso.com' with object id '00000000-0000-0000-0000-000000000001' does not have "
        f"authorization to perform action '{action}' over scope '{scope}' or the scope is invalid. If access was "
        "recently granted, please refresh your credentials.")}}


# A job that failed, as the run history's RunDetails.error carries it (RunHistory's ErrorResponse: a RootError
# with code and message; the message is Azure ML's own for a user process that exited non-zero).
JOB_ERROR = {"error": {"code": "UserError", "message": (
    "Execution failed. User process 'python' exited with status code 1. Please check log file "
    "'user_logs/std_log.txt' for error details. Error: Traceback (most recent call last):\n"
    "  File \"fine_tune.py\", line 12, in <module>\n"
    "RuntimeError: --require_gpu: torch sees no CUDA device")},
    "time": "2026-12-06T21:00:00.000Z", "componentName": "CommonRuntime"}

# A deployment whose container did not start (the operation's error: Azure ML's ResourceNotReady, as its
# troubleshooting page names it for a container that crashes at boot).
DEPLOYMENT_ERROR = {"code": "ResourceNotReady", "message": (
    "User container has crashed or terminated. Please see troubleshooting guide, available here: "
    "https://aka.ms/oe-tsg#error-resourcenotready")}

# Endpoint names are unique per region: Azure's answer when the name is taken (its text as quoted in
# Azure/azureml-examples PR #1931; the status and code around it are ARM's ErrorResponse for a bad request).
NAME_TAKEN = {"error": {"code": "BadArgument", "message": (
    '{"errors":{"":["There is already an endpoint with this name, Endpoint name needs to be unique within a '
    'region. Try some other name."]},"title":"One or more validation errors occurred."}')}}


# Who made a resource and when, as every example's systemData carries it.
SYSTEM_DATA = {"createdAt": "2026-12-06T21:00:00.000Z", "createdBy": "learner@contoso.com", "createdByType": "User",
               "lastModifiedAt": "2026-12-06T21:00:00.000Z", "lastModifiedBy": "learner@contoso.com",
               "lastModifiedByType": "User"}


class AzureMLStandIn(Recording):
    """The workspace WORKSPACE in LOCATION, its region's quota, and the calls on it, as Azure answers them."""

    ARM, REGION, STORAGE = "management.azure.com", f"{LOCATION}.api.azureml.ms", "standinstore.blob.core.windows.net"
    HOSTS = (ARM, REGION, STORAGE)
    CONTAINER = "azureml-blobstore-stand-in"

    def __init__(self, certificate: tuple[Path, Path], token: str = TOKEN):
        self.token = token
        self.scope = f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{GROUP}/providers/{PROVIDER}/workspaces/{WORKSPACE}"
        self.resources: dict[str, dict] = {}  # ARM id (lower case) -> the resource as GET answers it
        self.operations: dict[str, dict] = {}  # operation id -> {"states": [...], "resource": id, "kind": ...}
        self.blobs: dict[str, bytes | str] = {}  # path -> content, and its metadata (x-ms-meta-* headers)
        self.metadata: dict[str, dict] = {}
        self.sizes, self.usages = [dict(s, **SIZE_FIELDS) for s in SIZES], list(USAGES)
        self.forbidden: set[str] = set()  # "vmSizes", "usages": answered 403 AuthorizationFailed
        self.job_statuses = ["Completed"]  # what the run history answers in turn (the last one repeats)
        self.job_error = JOB_ERROR
        self.log_lines = ["Loading the base model", "Training: 100%", "Saved the model"]
        self.operation_states = {"computes": ["Succeeded"], "onlineEndpoints": ["Succeeded"],
                                 "deployments": ["Succeeded"]}  # each LRO's answers in turn, by kind
        self.taken_endpoint_names: set[str] = set()
        self.cluster_nodes: dict[str, list[dict]] = {}  # a cluster's allocated nodes (none unless told)
        self.interrupt_at: tuple[str, int] | None = None  # (route kind, nth request): Ctrl-C then
        self.counts: dict[str, int] = {}
        super().__init__(self.answer, certificate)
        self.port = int(self.base_url.rsplit(":", 1)[1])
        self.server.RequestHandlerClass = raw_and_delete(self.server.RequestHandlerClass, self)

    # ---- what the learner does at the keyboard -------------------------------------------------------
    def ctrl_c_at(self, kind: str, nth: int = 1) -> None:
        """Press Ctrl-C while the script waits on the nth request of this kind: "run details", or the status of a
        long-running operation on "computes", "onlineEndpoints" or "deployments" (e.g. "deployments status")."""
        self.interrupt_at = (kind, nth)

    def count(self, kind: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.interrupt_at == (kind, self.counts[kind]):
            # SIGINT to the main thread, as the terminal sends it: it raises KeyboardInterrupt there, in the
            # blocking call it is in (the HTTP read, or the wait on the poller's thread), as a Ctrl-C does.
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    # ---- routing ---------------------------------------------------------------------------------------
    def answer(self, request):
        host = request["headers"].get("Host", "").split(":")[0]
        url = urlsplit(request["path"])
        if host == self.STORAGE:
            return self.storage(request, url)
        if host == self.REGION and url.path == "/discovery":  # anonymous, as Azure's
            return self.region(request, url.path)
        if request["headers"].get("Authorization") != f"Bearer {self.token}":
            return 401, {"error": {"code": "AuthenticationFailed", "message": "no valid token"}}, {}
        if host == self.REGION:
            return self.region(request, url.path)
        if host == self.ARM:
            return self.resource_manager(request, url.path)
        return not_found(host + url.path)

    def resource_manager(self, request, path):
        method, body = request["method"], request["body"]
        regional = f"/subscriptions/{SUBSCRIPTION}/providers/{PROVIDER}/locations/{LOCATION}"
        if path == f"{regional}/vmSizes":  # EXAMPLES 2023-08-01-preview/examples/VirtualMachineSize/list.json
            if "vmSizes" in self.forbidden:
                return 403, authorization_failed(f"{PROVIDER}/locations/vmsizes/read", regional), {}
            return 200, {"value": self.sizes}, {}
        if path == f"{regional}/usages":  # EXAMPLES 2023-08-01-preview/examples/Usage/list.json
            if "usages" in self.forbidden:
                return 403, authorization_failed(f"{PROVIDER}/locations/usages/read", regional), {}
            return 200, {"value": self.usages}, {}
        match = re.fullmatch(rf"{regional}/(?:mfe|compute)OperationsStatus/([\w-]+)", path)
        if match:
            return self.operation_status(match.group(1))
        if not path.lower().startswith(self.scope.lower()):
            return not_found(path)
        route = path[len(self.scope):]
        if route == "" and method == "GET":
            return 200, self.workspace(), {}
        if route == "/datastores/workspaceblobstore" or (route == "/datastores" and method == "GET"):
            return self.datastores(route)
        if route == "/datastores/workspaceblobstore/listSecrets":  # EXAMPLES 2023-04-01-preview/examples/
            return 200, {"secretsType": "AccountKey", "key": ACCOUNT_KEY}, {}  # Datastore/listSecrets.json
        match = re.fullmatch(r"/computes/([^/]+)/listNodes", route)
        if match:  # EXAMPLES 2023-08-01-preview/examples/Compute/listNodes.json: the cluster's allocated nodes
            return 200, {"nodes": self.cluster_nodes.get(match.group(1), []), "nextLink": None}, {}
        match = re.fullmatch(r"/jobs/([^/]+)/cancel", route)
        if match:
            return self.cancel_job(match.group(1))
        match = re.fullmatch(r"/onlineEndpoints/([^/]+)/listKeys", route)
        if match:  # EXAMPLES 2024-10-01-preview/examples/Workspace/OnlineEndpoint/listKeys.json (EndpointAuthKeys)
            return 200, {"primaryKey": "stand-in-primary-key", "secondaryKey": "stand-in-secondary-key"}, {}
        match = re.fullmatch(r"/onlineEndpoints/([^/]+)/deployments/([^/]+)/getLogs", route)
        if match:  # EXAMPLES 2023-04-01-preview/examples/OnlineDeployment/getLogs.json
            return 200, {"content": "Liveness probe failed: connection refused\nContainer crashed at boot"}, {}
        match = re.fullmatch(r"/codes/([^/]+)/versions/([^/]+)/startPendingUpload", route)
        if match:  # EXAMPLES 2023-08-01-preview/examples/Workspace/CodeVersion/createOrGetStartPendingUpload.json
            container = f"https://{self.STORAGE}/{self.CONTAINER}/LocalUpload/{match.group(1)}"
            return 200, {"blobReferenceForConsumption": {
                "blobUri": container, "storageAccountArmId": f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{GROUP}"
                "/providers/Microsoft.Storage/storageAccounts/standinstore",
                "credential": {"credentialType": "SAS", "sasUri": container + "?sv=2025-01-05&sig=stand-in-sas"}},
                "pendingUploadId": str(uuid.uuid4()), "pendingUploadType": "TemporaryBlobReference"}, {}
        match = re.fullmatch(r"/(environments|codes|models)/([^/]+)/versions", route)
        if match and method == "GET":  # EXAMPLES 2023-08-01-preview/examples/Workspace/{Environment,Code,
            return self.listing(route)  # Model}Version/list.json
        match = re.fullmatch(r"/onlineEndpoints/([^/]+)/deployments", route)
        if match and method == "GET":  # EXAMPLES 2022-02-01-preview/examples/OnlineDeployment/list.json
            return self.listing(route)
        if method == "GET" and route in ("/onlineEndpoints", "/computes"):
            return self.listing(route)
        if method == "GET":
            return self.get(path)
        if method == "PUT":
            return self.put(path, route, body)
        if method == "DELETE":
            return self.delete(path)
        return not_found(path)

    # ---- ARM resources ---------------------------------------------------------------------------------
    def workspace(self) -> dict:
        """EXAMPLES 2024-10-01-preview/examples/Workspace/get.json, the fields azure-ai-ml reads (discoveryUrl: the
        region's host, as Azure gives it; the example has a placeholder)."""
        return {"id": self.scope, "name": WORKSPACE, "type": f"{PROVIDER}/workspaces", "location": LOCATION,
                "kind": "Default", "identity": {"type": "SystemAssigned"},
                "properties": {
                    "friendlyName": WORKSPACE, "provisioningState": "Succeeded",
                    "discoveryUrl": f"https://{self.REGION}/discovery",
                    "mlFlowTrackingUri": f"azureml://{self.REGION}/mlflow/v1.0{self.scope}",
                    "storageAccount": f"/subscriptions/{SUBSCRIPTION}/resourceGroups/{GROUP}/providers/"
                                      "Microsoft.Storage/storageAccounts/standinstore",
                    "workspaceId": "00000000-aaaa-bbbb-cccc-000000000001"}}

    def datastores(self, route):
        """EXAMPLES 2023-04-01-preview/examples/Datastore/get.json: the workspace's default AzureBlob datastore."""
        store = {"id": self.scope + "/datastores/workspaceblobstore", "name": "workspaceblobstore",
                 "type": f"{PROVIDER}/workspaces/datastores", "properties": {
                     "datastoreType": "AzureBlob", "isDefault": True, "accountName": "standinstore",
                     "containerName": self.CONTAINER, "endpoint": "core.windows.net", "protocol": "https",
                     "credentials": {"credentialsType": "AccountKey"}}}
        return 200, ({"value": [store]} if route == "/datastores" else store), {}

    def get(self, path):
        resource = self.resources.get(path.lower())
        return (200, resource, {}) if resource else not_found(path)

    def listing(self, route):
        prefix = (self.scope + route + "/").lower()
        found = [r for key, r in self.resources.items() if key.startswith(prefix) and "/" not in key[len(prefix):]]
        return 200, {"value": found}, {}

    def put(self, path, route, body):
        kind = route.split("/")[1]
        resource = {**(body or {}), "id": path, "name": path.rsplit("/", 1)[1], "type": arm_type(route),
                    "systemData": SYSTEM_DATA}
        properties = resource.setdefault("properties", {})
        if kind == "jobs":  # EXAMPLES 2024-01-01-preview/examples/Job/CommandJob/createOrUpdate.json (201)
            name = resource["name"]
            properties.update(status="Starting", services={"Studio": {
                "jobServiceType": "Studio", "endpoint": f"https://ml.azure.com/runs/{name}?wsid={self.scope}"},
                "Tracking": {"jobServiceType": "Tracking",
                             "endpoint": f"azureml://{self.REGION}/mlflow/v1.0{self.scope}"}})
            self.resources[path.lower()] = resource
            return 201, resource, {}
        if kind in ("environments", "codes", "models"):  # EXAMPLES 2023-08-01-preview/examples/Workspace/
            # {Environment,Code,Model}Version/createOrUpdate.json
            properties.setdefault("provisioningState", "Succeeded")
            if kind == "models" and properties.get("modelType") == "mlflow_model":
                # Azure reads an MLflow model's flavors from its MLmodel file (ModelVersion/createOrUpdate.json)
                properties.setdefault("flavors", {"python_function": {"data": {"loader_module": "mlflow.pyfunc"}}})
            self.resources[path.lower()] = resource
            return 200, resource, {}
        if kind == "onlineEndpoints" and route.count("/") == 2:
            name = resource["name"]
            if name in self.taken_endpoint_names:
                return 400, NAME_TAKEN, {}
            # EXAMPLES 2022-02-01-preview/examples/OnlineEndpoint/createOrUpdate.json
            properties.setdefault("properties", {"azureml.onlineendpointid": path})  # as Azure fills it
            properties.update(scoringUri=f"https://{name}.{LOCATION}.inference.ml.azure.com/score",
                              swaggerUri=f"https://{name}.{LOCATION}.inference.ml.azure.com/swagger.json")
            return self.start_operation(path, resource, "onlineEndpoints", "mfe")
        if kind == "onlineEndpoints":  # a deployment: EXAMPLES 2023-04-01-preview/examples/OnlineDeployment/
            # ManagedOnlineDeployment/createOrUpdate.json
            properties.setdefault("scaleSettings", {"scaleType": "Default"})  # what Azure fills in
            return self.start_operation(path, resource, "deployments", "mfe")
        if kind == "computes":  # EXAMPLES 2023-08-01-preview/examples/Compute/createOrUpdate/BasicAmlCompute.json
            return self.start_operation(path, resource, "computes", "compute")
        return not_found(path)

    def start_operation(self, path, resource, kind, service):
        """201 with the resource Creating (Updating when it exists) and Azure-AsyncOperation, as ARM answers."""
        existing = self.resources.get(path.lower())
        resource["properties"]["provisioningState"] = "Updating" if existing else "Creating"
        self.resources[path.lower()] = resource
        operation = str(uuid.uuid4())
        self.operations[operation] = {"states": list(self.operation_states[kind]), "resource": path.lower(),
                                      "kind": kind}
        return 201 if not existing else 200, resource, self.async_headers(operation, service)

    def async_headers(self, operation, service):
        regional = f"https://{self.ARM}/subscriptions/{SUBSCRIPTION}/providers/{PROVIDER}/locations/{LOCATION}"
        return {"Azure-AsyncOperation": f"{regional}/{service}OperationsStatus/{operation}"
                                        "?api-version=2023-04-01-preview", "x-ms-async-operation-timeout": "PT1H"}

    def operation_status(self, operation):
        """The async operation's status (ARM RPC's async-api-reference): InProgress until its last state."""
        entry = self.operations.get(operation)
        if entry is None:
            return not_found(operation)
        self.count(f"{entry['kind']} status")
        state = entry["states"].pop(0) if len(entry["states"]) > 1 else entry["states"][0]
        status = {"id": f"/subscriptions/{SUBSCRIPTION}/providers/{PROVIDER}/locations/{LOCATION}/"
                        f"OperationsStatus/{operation}", "name": operation, "status": state,
                  "startTime": "2026-12-06T21:00:00Z"}
        resource = self.resources.get(entry["resource"])
        if state in ("Succeeded", "Failed", "Canceled"):
            status["endTime"] = "2026-12-06T21:20:00Z"
            if resource is not None and entry.get("delete"):
                self.resources.pop(entry["resource"], None)
            elif resource is not None:
                resource["properties"]["provisioningState"] = state
        if state == "Failed":  # the tests fail deployments: their container's error
            status["error"] = DEPLOYMENT_ERROR
        # A poll that finds it still running says when to look again (ARM sends Retry-After with it).
        return 200, status, ({"Retry-After": "1"} if state == "InProgress" else {})

    def delete(self, path):
        """202 (EXAMPLES 2022-02-01-preview/examples/OnlineDeployment/delete.json and OnlineEndpoint/delete.json),
        with Azure-AsyncOperation and Location as the spec's 202 headers; the resource is gone once it succeeds."""
        if path.lower() not in self.resources:
            return 204, None, {}
        operation = str(uuid.uuid4())
        self.operations[operation] = {"states": ["Succeeded"], "resource": path.lower(), "kind": "delete",
                                      "delete": True}
        self.resources[path.lower()]["properties"]["provisioningState"] = "Deleting"
        headers = self.async_headers(operation, "mfe")
        return 202, None, {**headers, "Location": headers["Azure-AsyncOperation"]}

    def cancel_job(self, name):
        """EXAMPLES 2024-01-01-preview/examples/Job/cancel.json: 202 with Location."""
        job = self.resources.get(f"{self.scope}/jobs/{name}".lower())
        if job is None:
            return not_found(name)
        job["properties"]["status"] = "CancelRequested"
        self.job_statuses = ["Canceled"]
        return 202, None, {"Location": f"https://{self.ARM}{self.scope}/jobs/{name}?api-version=2024-01-01-preview"}

    # ---- the region's host: discovery and run history --------------------------------------------------
    def region(self, request, path):
        if path == "/discovery":  # the workspace's discoveryUrl: where each of its services lives
            base = f"https://{self.REGION}"
            return 200, {"api": base, "catalog": base, "experimentation": base, "gallery": base, "history": base,
                         "hyperdrive": base, "labeling": base, "modelmanagement": base, "pipelines": base,
                         "studiourl": "https://ml.azure.com"}, {}
        match = re.fullmatch(rf"/history/v1\.0{re.escape(self.scope)}/runs/([^/]+)/details", path, re.IGNORECASE)
        if match:
            return self.run_details(match.group(1))
        return not_found(self.REGION + path)

    def run_details(self, name):
        """The run's RunDetails (data-plane Microsoft.MachineLearningServices.RunHistory/stable/v1.0/
        run-history.json: status, error, logFiles, each log file a SAS URL on the workspace's storage)."""
        status = self.job_statuses.pop(0) if len(self.job_statuses) > 1 else self.job_statuses[0]
        self.count("run details")
        job = self.resources.get(f"{self.scope}/jobs/{name}".lower())
        if job is not None:
            job["properties"]["status"] = status
        log = (f"https://{self.STORAGE}/{self.CONTAINER}/ExperimentRun/dcid.{name}/user_logs/std_log.txt"
               "?sv=2025-01-05&sig=stand-in-sas")
        target = (job or {}).get("properties", {}).get("computeId", "").rsplit("/", 1)[-1]
        details = {"runId": name, "runUuid": "00000000-aaaa-bbbb-cccc-000000000002", "status": status,
                   "target": target, "startTimeUtc": "2026-12-06T21:00:00.000Z",
                   "logFiles": {"user_logs/std_log.txt": log} if status != "Queued" else {}, "warnings": None}
        if status == "Failed":
            details["error"] = self.job_error
        return 200, details, {}

    # ---- the storage account ---------------------------------------------------------------------------
    def storage(self, request, url):
        path = url.path
        # Signed by the SAS Azure ML handed out (startPendingUpload, the log files) or with the account's key.
        signed = "sig=stand-in-sas" in url.query or request["headers"].get("Authorization", "").startswith(
            "SharedKey standinstore:")
        if not signed:
            return 403, None, {"x-ms-error-code": "AuthenticationFailed"}
        if path.endswith("/user_logs/std_log.txt") and request["method"] == "GET":
            return 200, Text("\n".join(self.log_lines) + "\n"), {}
        blob = {"ETag": '"0x8DD000000000001"', "Last-Modified": "Sun, 06 Dec 2026 21:00:00 GMT",
                "x-ms-version": "2025-01-05"}
        if request["method"] == "PUT" and "comp=metadata" in url.query:  # Set Blob Metadata: 200
            self.metadata[path] = {k: v for k, v in request["headers"].items() if k.lower().startswith("x-ms-meta-")}
            return 200, None, {**blob, "x-ms-request-server-encrypted": "true"}
        if request["method"] == "PUT":  # Put Blob: 201
            self.blobs[path] = request["body"]
            return 201, None, {**blob, "x-ms-request-server-encrypted": "true"}
        if request["method"] in ("GET", "HEAD") and path in self.blobs:  # Get Blob (Properties)
            return 200, None, {**blob, "x-ms-blob-type": "BlockBlob", **self.metadata.get(path, {})}
        return 404, None, {"x-ms-error-code": "BlobNotFound"}

    def add_completed_job(self, name: str, outputs=("model_output", "quantized_model_output")) -> None:
        """A fine-tuning job that ended Completed, with its MLflow model outputs (EXAMPLES 2024-01-01-preview/
        examples/Job/CommandJob/get.json, this workspace's values)."""
        self.resources[f"{self.scope}/jobs/{name}".lower()] = {
            "id": f"{self.scope}/jobs/{name}", "name": name, "type": f"{PROVIDER}/workspaces/jobs",
            "properties": {
                "jobType": "Command", "status": "Completed", "displayName": "fine-tune-phi-3",
                "experimentName": "finetune-phi", "command": "python fine_tune.py",
                "computeId": f"{self.scope}/computes/gpu-nc24s-a100-v4",
                "environmentId": f"{self.scope}/environments/phi-3-training-environment/versions/1",
                "outputs": {output: {"jobOutputType": "mlflow_model", "mode": "ReadWriteMount",
                                     "uri": f"azureml://datastores/workspaceblobstore/ExperimentRun/dcid.{name}/"
                                            f"{output}"}
                            for output in outputs},
                "services": {"Studio": {"jobServiceType": "Studio", "endpoint": f"https://ml.azure.com/runs/{name}"}}}}

    def add_cluster(self, name: str, size: str, nodes: int = 0, min_nodes: int = 0, max_nodes: int = 1) -> None:
        """An AmlCompute cluster that exists, with `nodes` allocated (EXAMPLES 2023-08-01-preview/examples/Compute/
        get/AmlCompute.json and Compute/listNodes.json, this workspace's values)."""
        self.resources[f"{self.scope}/computes/{name}".lower()] = {
            "id": f"{self.scope}/computes/{name}", "name": name, "location": LOCATION,
            "type": f"{PROVIDER}/workspaces/computes",
            "properties": {"computeType": "AmlCompute", "provisioningState": "Succeeded", "computeLocation": LOCATION,
                           "properties": {"vmSize": size, "vmPriority": "Dedicated", "osType": "Linux",
                                          "scaleSettings": {"maxNodeCount": max_nodes, "minNodeCount": min_nodes,
                                                            "nodeIdleTimeBeforeScaleDown": "PT2M"},
                                          "allocationState": "Steady", "currentNodeCount": nodes,
                                          "targetNodeCount": nodes}}}
        self.cluster_nodes[name] = [{"nodeId": f"tvm-3601533753_{i + 1}-20261206t210000z", "port": 50000 + i,
                                     "privateIpAddress": "10.0.0.4", "nodeState": "running"} for i in range(nodes)]

    def add_compute_instance(self, name: str, size: str, state: str) -> None:
        """A compute instance in `state` (EXAMPLES 2023-08-01-preview/examples/Compute/get/ComputeInstance.json)."""
        self.resources[f"{self.scope}/computes/{name}".lower()] = {
            "id": f"{self.scope}/computes/{name}", "name": name, "location": LOCATION,
            "type": f"{PROVIDER}/workspaces/computes",
            "properties": {"computeType": "ComputeInstance", "provisioningState": "Succeeded",
                           "properties": {"vmSize": size, "state": state, "applicationSharingPolicy": "Personal",
                                          "computeInstanceAuthorizationType": "personal"}}}

    def add_endpoint(self, name: str, deployments: dict[str, str]) -> None:
        """An endpoint that exists, with deployments in the given provisioning states (EXAMPLES 2022-02-01-preview/
        examples/OnlineEndpoint/get.json, EXAMPLES 2023-04-01-preview/examples/OnlineDeployment/ManagedOnlineDeployment/
        get.json, this workspace's values)."""
        endpoint = f"{self.scope}/onlineEndpoints/{name}"
        self.resources[endpoint.lower()] = {
            "id": endpoint, "name": name, "type": f"{PROVIDER}/workspaces/onlineEndpoints", "location": LOCATION,
            "identity": {"type": "UserAssigned", "userAssignedIdentities": {}}, "systemData": SYSTEM_DATA,
            "properties": {"authMode": "Key", "provisioningState": "Succeeded", "traffic": {d: 0 for d in deployments},
                           "properties": {"azureml.onlineendpointid": endpoint},
                           "scoringUri": f"https://{name}.{LOCATION}.inference.ml.azure.com/score"}}
        for deployment, state in deployments.items():
            self.resources[f"{endpoint}/deployments/{deployment}".lower()] = {
                "id": f"{endpoint}/deployments/{deployment}", "name": deployment, "location": LOCATION,
                "type": f"{PROVIDER}/workspaces/onlineEndpoints/deployments", "systemData": SYSTEM_DATA,
                "sku": {"name": "Default", "capacity": 1},
                "properties": {"endpointComputeType": "Managed", "instanceType": "Standard_E4s_v3",
                               "provisioningState": state, "scaleSettings": {"scaleType": "Default"},
                               "model": f"{self.scope}/models/finetune-phi-model-int4/versions/1"}}

    # ---- what the tests read -----------------------------------------------------------------------------
    def called(self, method: str, route: str) -> list[dict]:
        """The requests to one ARM route, written after the workspace's scope ("" for the workspace)."""
        return [r for r in self.requests
                if r["method"] == method and urlsplit(r["path"]).path.lower() == (self.scope + route).lower()]

    def resource(self, route: str) -> dict | None:
        return self.resources.get((self.scope + route).lower())


class Text(str):
    """A plain-text body (a log file), sent as it is rather than as JSON."""


def raw_and_delete(base, recording):
    """Recording's handler, taking DELETE and HEAD too (ARM's deletes, azure-storage-blob's checks) and sending
    a Text body as text/plain."""

    class Handler(base):
        def handle_any(self):
            request = read_request(self)
            recording.requests.append(request)
            status, answer, headers = recording.answer(request)
            if isinstance(answer, Text):
                payload = answer.encode()
                headers = {"Content-Type": "text/plain; charset=utf-8", **headers}
            else:
                payload = b"" if answer is None else json.dumps(answer).encode()
                headers = {"Content-Type": "application/json", **headers}
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = handle_any

    return Handler


def arm_type(route: str) -> str:
    kinds = [part for i, part in enumerate(route.strip("/").split("/")) if i % 2 == 0]
    return "/".join([f"{PROVIDER}/workspaces", *kinds])


def not_found(what: str):
    return 404, {"error": {"code": "ResourceNotFound", "message": f"The resource '{what}' was not found."}}, {}


def reach_stand_in(monkeypatch, folder: Path, script) -> AzureMLStandIn:
    """A stand-in that `script`'s real MLClient reaches as it would Azure: the hosts resolve to it, its certificate
    (made in `folder`) is trusted, the workspace settings name it. Stop it with close() after wait_for_pollers()."""
    import config

    certificate = make_certificate(folder, AzureMLStandIn.HOSTS)
    stand_in = AzureMLStandIn(certificate)
    resolve_to_stand_in(monkeypatch, AzureMLStandIn.HOSTS, stand_in.port)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(certificate[0]))  # requests', under azure-core and azure-ai-ml
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    for name, value in (("AZURE_SUBSCRIPTION_ID", SUBSCRIPTION), ("AZURE_RESOURCE_GROUP_NAME", GROUP),
                        ("AZURE_ML_WORKSPACE_NAME", WORKSPACE)):
        monkeypatch.setattr(config, name, value)
    monkeypatch.setattr(config, "ENV_FILE", folder / ".env")
    # The one thing not Azure's: the Azure CLI login gives way to a static token (what `az login` would give),
    # in the module that builds the MLClient.
    client_module = sys.modules[script.get_ml_client.__module__]
    monkeypatch.setattr(client_module, "AzureCliCredential", lambda: StaticCredential(TOKEN))
    # azure-ai-ml waits 2 to 60 s between the run history's answers, read from AZUREML_RUN_POLLING_INTERVAL_MIN
    # and _MAX when it is imported (already done here): the same setting, 0, on the class they fill.
    from azure.ai.ml.operations._run_history_constants import RunHistoryConstants

    monkeypatch.setattr(RunHistoryConstants, "_WAIT_COMPLETION_POLLING_INTERVAL_MIN", 0)
    monkeypatch.setattr(RunHistoryConstants, "_WAIT_COMPLETION_POLLING_INTERVAL_MAX", 0)
    return stand_in


def wait_for_pollers(timeout: float = 10.0) -> None:
    """Let the SDK's pollers a Ctrl-C left behind finish (they poll on in a thread of their own, as in the
    learner's process until it exits), so that none outlives the stand-in."""
    deadline = time.monotonic() + timeout
    for thread in threading.enumerate():
        if thread.name.startswith("LROPoller("):
            thread.join(max(0.0, deadline - time.monotonic()))
