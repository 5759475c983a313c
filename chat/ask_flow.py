"""One question through the Prompt flow, as `pf flow test` answers it: what `make local` and
`deploy_model.py --rehearsal` ask the endpoint they just served."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from config import ROOT
from chat import pf_home

OUTPUTS = ROOT / "outputs"


def ask_the_flow(question: str, settings: dict | None = None, outputs: Path = OUTPUTS) -> str:
    """One question through the Prompt flow, as `pf flow test` answers it; `settings` override .env's."""
    # Greedy decoding, so the tiny model's answer is its best one; pf keeps quiet state under outputs/.
    env = {**os.environ, **pf_home.prepare(outputs / "promptflow"), "AZURE_ML_TEMPERATURE": "0", **(settings or {})}
    pf = Path(sys.executable).with_name("pf")
    command = [pf, "flow", "test", "--flow", ".", "--inputs", f"input_data={question}"]
    print(f"\n== Step 4: ask the Prompt flow\n$ AZURE_ML_TEMPERATURE=0 {shlex.join(map(str, command))}", flush=True)
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode:
        errors = [line for line in result.stdout.splitlines() if "failed with" in line or "Error" in line]
        sys.exit(f"local pipeline: the flow failed: {(errors or result.stdout.splitlines() or ['no output'])[-1]}")
    return json.loads(result.stdout[result.stdout.rindex("{"):])["answer"]
