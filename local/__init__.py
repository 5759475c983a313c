"""The whole tutorial run on this machine (`make local`, pipeline.py), and the project-local, quiet
homes it and the tests give MLflow (mlflow_store.py) and Prompt flow (pf_home.py), so that nothing
is written to `~` and nothing is sent anywhere."""
