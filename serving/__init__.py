"""What serves the fine-tuned model.

- scoring/score.py: the scoring script, the one folder Azure uploads as the int4 deployment's code;
- conda.yml: the int4 deployment's environment on Azure;
- endpoint.py: the local endpoint, azmlinfsrv running that script as a managed deployment does;
- gateway.py: what Azure's gateway does in front of it (the key check), run inside azmlinfsrv;
- processes.py: starting a server with a log, waiting until it is live, stopping it and its workers.
"""
