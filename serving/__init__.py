"""What serves the fine-tuned model.

- scoring/score.py: the scoring script, the one folder Azure uploads as the int4 deployment's code;
- conda.yml: the int4 deployment's environment on Azure;
- local_endpoint.py: the local endpoint, azmlinfsrv running that script as a managed deployment does;
- gateway.py: what Azure's gateway does in front of it (the key check), run inside azmlinfsrv;
- processes.py: starting a server with a log, waiting until it is live, stopping it and its workers.
"""

# A managed online deployment's request_timeout_ms: Azure's maximum (180 s). deploy_model.py deploys
# with it and the local endpoint's azmlinfsrv gives up on a request after it, as Azure's does.
REQUEST_TIMEOUT_MS = 180_000
