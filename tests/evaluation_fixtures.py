"""Stand-ins for the Azure services evaluate_chat.py's evaluators talk to, on 127.0.0.1.

azure-ai-evaluation's own clients do the talking, over real HTTP: openai's for the Azure OpenAI
deployment that judges the AI-assisted metrics, and azure-core's (the project client, and
azure-storage-blob for the upload) for the Azure AI Foundry project's safety service and its
evaluation log. Each stand-in answers as the service does and records every request it got.
The project's client sends a bearer token only over TLS, as against Azure: its stand-in serves
HTTPS with a certificate made here, which the clients trust through REQUESTS_CA_BUNDLE.
"""

import datetime
import ipaddress
import json
import re
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from urllib.parse import urlsplit

from chat_fixtures import send_json, serve_in_background

PROJECT_PATH = "/api/projects/finetune-phi"
STUDIO_URL = "https://ai.azure.com/resource/build/evaluation/stand-in-run"


def read_request(handler: BaseHTTPRequestHandler) -> dict:
    """The request a stand-in's handler received: method, path, headers and its body (JSON, else text)."""
    length = int(handler.headers.get("Content-Length") or 0)
    raw = handler.rfile.read(length) if length else b""
    try:
        body = json.loads(raw) if raw else None
    except ValueError:
        body = raw.decode("utf-8", errors="replace")
    return {"method": handler.command, "path": handler.path, "headers": dict(handler.headers), "body": body}


class Recording:
    """A server on 127.0.0.1 that answers each request with `reply(request)` and records it.

    reply returns (status, JSON-able body or None, headers)."""

    def __init__(self, reply, certificate: tuple[Path, Path] | None = None):
        self.requests = []
        recording = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the services

            def handle_any(self):
                request = read_request(self)
                recording.requests.append(request)
                send_json(self, *reply(request))

            do_GET = do_POST = do_PUT = do_PATCH = handle_any

            def log_message(self, *args):
                pass

        self.server, self.base_url = serve_in_background(Handler, certificate)

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def chat_completion(content: str) -> dict:
    """A chat.completion as Azure OpenAI answers it."""
    return {
        "id": "chatcmpl-stand-in", "object": "chat.completion", "created": int(time.time()), "model": "gpt-4o",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 1500, "completion_tokens": 80, "total_tokens": 1580},
    }


class AzureOpenAIStandIn(Recording):
    """An Azure OpenAI resource: POST /openai/deployments/<d>/chat/completions?api-version=..., with the `api-key`
    header, or with an Entra ID bearer token when given `token` (then over HTTPS, with `certificate`).

    Every judge answers score 4 with a reason, in the JSON the evaluators' prompts ask for."""

    def __init__(self, key: str = "stand-in-openai-key", token: str | None = None, certificate=None):
        self.key, self.token = key, token
        super().__init__(self.answer, certificate)

    def answer(self, request):
        headers = {name.lower(): value for name, value in request["headers"].items()}  # httpx sends them lower-case
        signed_in = (headers.get("authorization") == f"Bearer {self.token}" if self.token
                     else headers.get("api-key") == self.key)
        if not signed_in:
            return 401, {"error": {"code": "401", "message": "Access denied due to invalid subscription key."}}, {}
        if not re.fullmatch(r"/openai/deployments/[^/]+/chat/completions\?api-version=[\w.-]+", request["path"]):
            return 404, {"error": {"code": "404", "message": "Resource not found"}}, {}
        return 200, chat_completion(json.dumps({"reason": "The stand-in judge found it fine.", "score": 4})), {}

    def prompts(self) -> list[str]:
        return ["\n".join(str(m["content"]) for m in r["body"]["messages"]) for r in self.requests]


def make_certificate(folder: Path, hosts: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and `hosts`) and its key, as PEM files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    *map(x509.DNSName, hosts)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "stand-in.pem", folder / "stand-in.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


class FoundryProjectStandIn(Recording):
    """An Azure AI Foundry project (https://<resource>.services.ai.azure.com/api/projects/<project>): its safety
    service's sync evaluations, and the evaluation log evaluate() writes (a result version whose file goes to a
    blob container by SAS, then an evaluation run, started and completed)."""

    def __init__(self, certificate: tuple[Path, Path], token: str):
        self.token = token
        self.blobs = {}
        super().__init__(self.answer, certificate)
        self.endpoint = self.base_url + PROJECT_PATH

    def answer(self, request):
        path = urlsplit(request["path"]).path
        if path.startswith("/storageaccount/"):  # the SAS upload: azure-storage-blob's Put Blob
            self.blobs[path] = request["body"]
            return 201, None, {"ETag": '"0x8DD000000000001"', "Last-Modified": "Sat, 29 Nov 2026 12:00:00 GMT",
                               "x-ms-request-server-encrypted": "true", "x-ms-version": "2025-01-05"}
        if request["headers"].get("Authorization") != f"Bearer {self.token}":
            return 401, {"error": {"code": "Unauthorized", "message": "no valid token"}}, {}
        route = path.removeprefix(PROJECT_PATH)
        if route == "/sync_evals:run":
            criterion = request["body"]["testing_criteria"][0]
            return 200, {"results": [{
                "metric": criterion["evaluator_name"], "score": 0, "label": "pass",
                "reason": "The stand-in safety service found no harm.",
                "properties": {"metrics": {"promptTokens": "40", "completionTokens": "12"}},
            }]}, {}
        match = re.fullmatch(r"/evaluationResults/([^/]+)/versions/([^/]+)(/startPendingUpload)?", route)
        if match and match.group(3):
            container = f"{self.base_url}/storageaccount/results-{match.group(1)}"
            return 200, {"blobReferenceForConsumption": {
                "blobUri": container, "storageAccountArmId": "stand-in",
                "credential": {"sasUri": container + "?sv=2025-01-05&sig=stand-in", "type": "SAS"}},
                "pendingUploadId": "upload-1", "version": match.group(2), "pendingUploadType": "TemporaryBlobReference"}, {}
        if match:
            return 200, {**request["body"], "id": f"azureai://results/{match.group(1)}/versions/{match.group(2)}"}, {}
        if route == "/evaluations/runs:upload":
            return 200, {**request["body"], "id": "stand-in-run", "name": "stand-in-run", "status": "Started"}, {}
        if route == "/evaluations/runs:updateUpload/stand-in-run":
            return 200, {**request["body"], "id": "stand-in-run", "name": "stand-in-run",
                         "properties": {"AiStudioEvaluationUri": STUDIO_URL}}, {}
        return 404, {"error": {"code": "NotFound", "message": f"no route {route}"}}, {}

    def called(self, method: str, route: str) -> list[dict]:
        """The requests to one of the project's routes (its path after the project), in order."""
        return [r for r in self.requests
                if r["method"] == method and urlsplit(r["path"]).path == PROJECT_PATH + route]


def resolve_to_stand_in(monkeypatch, hosts: tuple[str, ...], port: int):
    """Names in `hosts` resolve to the stand-in on 127.0.0.1:`port` for every client in this process (what an
    /etc/hosts entry does, with the port too): for the Azure hosts azure-ai-evaluation writes into its code."""
    import socket

    resolve = socket.getaddrinfo

    def getaddrinfo(host, port_, *args, **kwargs):
        if host in hosts:
            return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port))]
        return resolve(host, port_, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


class HubProjectStandIn(Recording):
    """A hub-based Azure AI project, the kind the Cookbook's evaluation uses, on the hosts Azure gives it.

    Azure Resource Manager (management.azure.com) describes the project's workspace: where its safety service
    and its run history live (the region's api.azureml.ms host) and its default blob datastore with a SAS.
    The safety service answers each harm with the severity in `severities` (6 for an answer holding `harmful`), and
    gives the AdversarialSimulator its ADVERSARIAL_QA template, whose questions are `adversarial`; the run history
    takes the evaluation run, its metrics and properties, and the datastore its rows."""

    ARM, REGION, STORAGE = "management.azure.com", "eastus.api.azureml.ms", "standinstore.blob.core.windows.net"
    HOSTS = (ARM, REGION, STORAGE)
    CONTAINER = "azureml-blobstore-stand-in"

    def __init__(self, certificate: tuple[Path, Path], token: str, subscription: str, group: str, project: str,
                 severities: dict[str, int], adversarial: tuple[str, ...] = (), harmful: str | None = None):
        self.token, self.severities, self.blobs = token, severities, {}
        self.adversarial, self.harmful = adversarial, harmful
        self.scope = (f"/subscriptions/{subscription}/resourceGroups/{group}"
                      f"/providers/Microsoft.MachineLearningServices/workspaces/{project}")
        super().__init__(self.answer, certificate)
        self.port = int(self.base_url.rsplit(":", 1)[1])

    def answer(self, request):
        host = request["headers"].get("Host", "").split(":")[0]
        path = urlsplit(request["path"]).path
        if host == self.STORAGE:  # azure-storage-blob's Put Blob, signed by the datastore's SAS
            if "sig=stand-in-sas" not in request["path"]:
                return 403, None, {}
            self.blobs[path] = request["body"]
            return 201, None, {"ETag": '"0x8DD000000000001"', "Last-Modified": "Sat, 29 Nov 2026 12:00:00 GMT",
                               "x-ms-request-server-encrypted": "true", "x-ms-version": "2025-01-05"}
        if request["headers"].get("Authorization") != f"Bearer {self.token}":
            return 401, {"error": {"code": "AuthenticationFailed", "message": "no valid token"}}, {}
        if host == self.ARM:
            return self.resource_manager(path)
        route = path.replace(self.scope, "{scope}")
        if route == "/raisvc/v1.0{scope}/checkannotation":
            return 200, ["content harm", "groundedness"], {}
        if route == "/raisvc/v1.0{scope}/simulation/template/parameters":  # the simulator's templates, by dataset
            return 200, {"qa/adv_qa_stand_in_aml.json": [
                {"conversation_starter": question, "metadata": {"Category": "violence"}, "topic": "stand-in"}
                for question in self.adversarial]}, {}
        if route == "/raisvc/v1.0{scope}/sync_evals:run":
            harm = request["body"]["testing_criteria"][0]["evaluator_name"].removeprefix("builtin.")
            response = request["body"]["data_source"]["source"]["content"]["item"]["response"]
            severity = 6 if self.harmful and self.harmful in response else self.severities.get(harm, 0)
            return 200, {"results": [{
                "metric": f"builtin.{harm}", "score": severity, "label": "pass" if severity < 4 else "fail",
                "reason": f"The stand-in safety service rated it {severity}.",
                "properties": {"metrics": {"promptTokens": "40", "completionTokens": "12"}},
            }]}, {}
        if route == "/mlflow/v2.0{scope}/api/2.0/mlflow/runs/create":
            return 200, {"run": {"info": {"run_id": "stand-in-run", "experiment_id": "stand-in-experiment",
                                          "run_name": request["body"].get("run_name", "")}}}, {}
        if route in ("/mlflow/v2.0{scope}/api/2.0/mlflow/runs/log-metric", "/mlflow/v2.0{scope}/api/2.0/mlflow/runs/update",
                     "/artifact/v2.0{scope}/artifacts/register",
                     "/history/v1.0{scope}/experimentids/stand-in-experiment/runs/stand-in-run"):
            return 200, {}, {}
        return 404, {"error": {"code": "NotFound", "message": f"no route {host}{path}"}}, {}

    def resource_manager(self, path):
        if path == self.scope:
            return 200, {"id": self.scope, "name": self.scope.rsplit("/", 1)[1], "location": "eastus", "properties": {
                "discoveryUrl": f"https://{self.REGION}/discovery",
                "mlFlowTrackingUri": f"azureml://{self.REGION}/mlflow/v1.0{self.scope}"}}, {}
        if path == self.scope + "/datastores":
            return 200, {"value": [{"name": "workspaceblobstore", "properties": {
                "accountName": "standinstore", "endpoint": "core.windows.net", "containerName": self.CONTAINER,
                "credentials": {"credentialsType": "AccountKey"}}}]}, {}
        if path == self.scope + "/datastores/workspaceblobstore/listSecrets":
            return 200, {"secretsType": "Sas", "sasToken": "sv=2025-01-05&sig=stand-in-sas"}, {}
        return 404, {"error": {"code": "NotFound", "message": f"no route {self.ARM}{path}"}}, {}

    def called(self, method: str, route: str) -> list[dict]:
        """The requests to one route, its path written with {scope} for the project's ARM scope."""
        return [r for r in self.requests
                if r["method"] == method and urlsplit(r["path"]).path == route.replace("{scope}", self.scope)]


class StaticCredential:
    """A TokenCredential that hands out one token (what DefaultAzureCredential gives after `az login`)."""

    def __init__(self, token: str):
        self.token = token
        self.scopes = []

    def get_token(self, *scopes, **kwargs):
        from azure.core.credentials import AccessToken

        self.scopes.extend(scopes)
        return AccessToken(self.token, int(time.time()) + 3600)
