"""The pinned dependency set: exact pins, and the Azure job's conda.yml agreeing with the tests'."""

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
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
    assert requirements["torch"] == "2.10.0"  # the Azure job's: a CUDA 12 build (see the resolution test)
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
    # Azure builds the int4 deployment's environment from serving/conda.yml; the model itself asks
    # for quantize_model.serving_requirements(), and the local endpoint runs that azmlinfsrv.
    import quantize_model

    conda = yaml.safe_load((ROOT / "serving" / "conda.yml").read_text())
    serving = pins(next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict)))
    for requirement in quantize_model.serving_requirements():
        name, version = requirement.split("==")
        assert serving.get(name.lower()) == version, requirement
    server = pins((ROOT / "serving" / "requirements-azmlinfsrv.txt").read_text().splitlines())
    assert serving["azureml-inference-server-http"] == server["azureml-inference-server-http"]
    assert not any(name.startswith(("torch", "nvidia", "onnxruntime-gpu", "onnxruntime-genai-cuda")) for name in serving)


# Azure builds both environments on Ubuntu 22.04 images (glibc 2.35), x86-64, with conda.yml's Python.
AZURE_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(17, 36)] + [
    "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64",
]


def conda_pip_section(path) -> tuple[str, list[str]]:
    """(python version, pip requirements) of a conda environment file."""
    conda = yaml.safe_load(path.read_text())
    python = next(d.split("=", 1)[1] for d in conda["dependencies"] if isinstance(d, str) and d.startswith("python="))
    return python, next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))


def resolve_from_the_index(path, tmp_path) -> dict[str, dict]:
    """What pip installs from the package index for a conda file's pip section on Azure's platform:
    {name: metadata}. Local wheels (PIP_FIND_LINKS) and this machine's pip settings are left out, so
    the answer is what Azure's image build gets."""
    python, requirements = conda_pip_section(path)
    listed = tmp_path / f"{path.parent.name}-{path.stem}.txt"
    listed.write_text("\n".join(requirements) + "\n")
    report = listed.with_suffix(".json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    platforms = [arg for platform in AZURE_PLATFORMS for arg in ("--platform", platform)]
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--ignore-installed", "--report", str(report),
         "--only-binary=:all:", "--implementation", "cp", "--python-version", python, *platforms, "-r", str(listed)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, f"{path} does not resolve for Azure:\n{result.stderr[-3000:]}"
    return {item["metadata"]["name"].lower().replace("_", "-").replace(".", "-"): item["metadata"] for item in json.loads(report.read_text())["install"]}


def cuda_major_of(torch_metadata: dict) -> int | None:
    """The CUDA major version a torch wheel was built for, from the CUDA runtime it requires."""
    for requirement in torch_metadata.get("requires_dist", []):
        match = re.match(r"nvidia-cuda-runtime-cu(\d+)\b", requirement) or re.match(r"cuda-toolkit==(\d+)\.", requirement)
        if match:
            return int(match.group(1))
    return None


@pytest.fixture(scope="module")
def azure_environments(tmp_path_factory):
    """Both Azure environments resolved from the index, side by side (each takes ~30 s of network)."""
    folder = tmp_path_factory.mktemp("resolve")
    files = {"training": ROOT / "conda.yml", "serving": ROOT / "serving" / "conda.yml"}
    with ThreadPoolExecutor(2) as pool:
        resolved = {name: pool.submit(resolve_from_the_index, path, folder) for name, path in files.items()}
        return {name: future.result() for name, future in resolved.items()}


def test_the_training_environment_resolves_to_a_torch_the_a100_hosts_drivers_run(azure_environments):
    # CUDA 12.x builds run on NVIDIA drivers r525 and later (minor-version compatibility), which
    # covers the 535-series drivers Azure hosts may still run; CUDA 13 (torch >= 2.11 on the index)
    # needs r580, and on an older host torch sees no GPU at all.
    training = azure_environments["training"]
    _, pinned = conda_pip_section(ROOT / "conda.yml")
    assert training["torch"]["version"] == pins(pinned)["torch"]
    assert cuda_major_of(training["torch"]) == 12, training["torch"].get("requires_dist")
    assert not [name for name in training if name.endswith("-cu13") or name == "cuda-toolkit"]
    for name, version in pins(pinned).items():
        assert training[name]["version"] == version, name


def test_the_int4_serving_environment_resolves_without_torch_or_cuda(azure_environments):
    serving = azure_environments["serving"]
    assert "onnxruntime-genai" in serving and "azureml-inference-server-http" in serving
    assert not [name for name in serving if name.startswith(("torch", "nvidia-", "cuda-"))], sorted(serving)


def test_the_agent_environment_is_the_pinned_one_and_consistent():
    # Step 4b's .venv-agent, built by `make setup` from chat/requirements-agent.txt: exactly those pins, and pip check
    # clean there (Agent Framework's OpenTelemetry, which promptflow-tracing refuses, lives only there).
    agent_python = ROOT / ".venv-agent" / "bin" / "python"
    pinned = pins((ROOT / "chat/requirements-agent.txt").read_text().splitlines())
    assert pinned["agent-framework-core"] == "1.23.0" and pinned["agent-framework-devui"] == "1.0.0b261022"
    frozen = subprocess.run([agent_python, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    assert pins(frozen) == pinned
    check = subprocess.run([agent_python, "-m", "pip", "check"], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert int(pinned["opentelemetry-api"].split(".")[1]) >= 39
    requirements = pins((ROOT / "requirements.txt").read_text().splitlines())
    assert int(requirements["opentelemetry-api"].split(".")[1]) < 39  # why it is an environment of its own
