"""The whole tutorial run on this machine (`make local`, pipeline.py), and the project-local MLflow store
it and the tests use (mlflow_store.py), so that nothing is written to `~`; Prompt flow's quiet home is
the chat's (chat/pf_home.py)."""
