"""The pinned dependency set: exact pins, and the Azure job's conda.yml agreeing with the tests'."""

import re

import yaml

from conftest import ROOT

PIN = re.compile(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;#]+)")


def pins(lines) -> dict[str, str]:
    found = {}
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            match = PIN.match(line)
            assert match, f"not an exact pin: {line!r}"
            found[match.group(1).lower().replace("_", "-")] = match.group(2)
    return found


def test_every_requirement_is_pinned_exactly():
    requirements = pins((ROOT / "requirements.txt").read_text().splitlines())
    assert requirements["torch"] == "2.13.0"  # the CPU wheel on disk; a bare torch pulls GBs of CUDA
    for name in ("transformers", "trl", "mlflow", "azure-ai-ml", "promptflow", "promptflow-devkit"):
        assert name in requirements, name


def test_conda_yml_pins_the_versions_the_tests_run():
    conda = yaml.safe_load((ROOT / "conda.yml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    job = pins(pip_section)
    requirements = pins((ROOT / "requirements.txt").read_text().splitlines())
    for name in ("torch", "transformers", "trl", "datasets", "peft", "accelerate", "mlflow", "azureml-mlflow"):
        assert name in job, f"conda.yml does not pin {name}"
    mismatched = {name: (version, requirements.get(name)) for name, version in job.items() if requirements.get(name) != version}
    assert not mismatched, f"conda.yml and requirements.txt disagree (conda.yml, requirements.txt): {mismatched}"
    assert "python=3.11" in conda["dependencies"]


def test_installed_versions_are_the_pinned_ones():
    from importlib.metadata import version

    requirements = pins((ROOT / "requirements.txt").read_text().splitlines())
    for name in ("torch", "transformers", "trl", "mlflow", "azure-ai-ml", "promptflow"):
        assert version(name).split("+")[0] == requirements[name], name


def test_installed_set_is_consistent():
    # The local environment holds every conda.yml package at the same version, so a clean
    # `pip check` here means pip can resolve the job's set too (the CUDA wheels aside).
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_int4_serving_environment_pins_what_the_int4_model_requires():
    # Azure builds the int4 deployment's environment from scoring/conda.yml; the model itself asks
    # for quantize_model.serving_requirements(), and the local endpoint runs that azmlinfsrv.
    import quantize_model

    conda = yaml.safe_load((ROOT / "scoring" / "conda.yml").read_text())
    serving = pins(next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict)))
    for requirement in quantize_model.serving_requirements():
        name, version = requirement.split("==")
        assert serving.get(name.lower()) == version, requirement
    server = pins((ROOT / "requirements-azmlinfsrv.txt").read_text().splitlines())
    assert serving["azureml-inference-server-http"] == server["azureml-inference-server-http"]
    assert not any(name.startswith(("torch", "nvidia", "onnxruntime-gpu", "onnxruntime-genai-cuda")) for name in serving)
