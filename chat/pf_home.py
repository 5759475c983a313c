"""A project-local, quiet Prompt flow home for the runs this project makes itself.

`pf` keeps its settings and state in PF_HOME_DIRECTORY (default ~/.promptflow). The local
pipeline and the tests point it at a folder of the project's, set up so that `pf flow test` and
`pf flow serve` send no telemetry (telemetry.enabled=false), start no trace service in the
background (trace.destination=none), and skip the weekly "newer version?" query: nothing but
the endpoint on 127.0.0.1 is contacted. It writes the files `pf config set` would, without
running `pf` first (whose first run would report telemetry before the setting exists).

promptflow builds an Azure Monitor log exporter when it is imported, whatever its telemetry setting,
and that exporter (azure-monitor-opentelemetry-exporter) polls Microsoft's OneSettings service from a
thread of its own; APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED=true, in the environment returned, stops it.
"""

import datetime
import json
import os
from pathlib import Path

from importlib.metadata import version


def prepare(home: Path) -> dict:
    """Write the settings into `home`; return the environment variables that select it."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "pf.yaml").write_text("telemetry:\n  enabled: 'false'\ntrace:\n  destination: none\n")
    # promptflow queries PyPI for a newer version when this file says it has not for 7 days.
    installed = version("promptflow-devkit")
    (home / "pf_version_check.json").write_text(json.dumps({
        "current_version": installed,
        "latest_version": installed,
        "last_check_time": str(datetime.datetime.now()),
        "last_hint_time": str(datetime.datetime.now()),
    }))
    return {"PF_HOME_DIRECTORY": str(home), "APPLICATIONINSIGHTS_CONTROLPLANE_DISABLED": "true"}


def use(home: Path) -> None:
    """Prepare `home` and select it for this process and the `pf` commands it starts."""
    os.environ.update(prepare(home))
