"""A local MLflow store for runs made on this machine: runs in a SQLite file, artifacts beside it.

A SQLite tracking store alone puts every artifact (fine_tune.py's eval_answers.json table) in
`./mlruns` of whatever folder the first process happened to run in. `prepare()` creates the
experiment with its artifact location next to the database instead, and returns the environment
variables that make fine_tune.py log there, with MLflow's usage telemetry off (MLflow 3 sends it
by default, from a background thread). `unless_set()` is the choice every local run makes: a store
of the learner's own (MLFLOW_TRACKING_URI) wins. Inside an Azure ML job none of this applies: the
job sets MLflow to the workspace's store.
"""

import os
from pathlib import Path

EXPERIMENT = "finetune-phi"  # the Azure job's experiment name too (setup_ml.py)


def prepare(database: Path, artifacts: Path, experiment: str = EXPERIMENT) -> dict:
    """Create (or reuse) `experiment` in the SQLite store `database` with artifacts under `artifacts`."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # before this process's first MLflow call
    from mlflow.tracking import MlflowClient

    database.parent.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{database}"
    client = MlflowClient(tracking_uri=uri)
    if client.get_experiment_by_name(experiment) is None:
        client.create_experiment(experiment, artifact_location=artifacts.resolve().as_uri())
    return {"MLFLOW_TRACKING_URI": uri, "MLFLOW_EXPERIMENT_NAME": experiment, "MLFLOW_DISABLE_TELEMETRY": "true"}


def unless_set(outputs: Path) -> dict:
    """prepare()'s store in `outputs` (mlflow.db, mlartifacts/), or {} when MLFLOW_TRACKING_URI names the learner's own."""
    if "MLFLOW_TRACKING_URI" in os.environ:
        return {}
    return prepare(outputs / "mlflow.db", outputs / "mlartifacts")
