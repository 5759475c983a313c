"""What setup_ml.py and deploy_model.py check before they create or bill anything.

- the region: the workspace's, unless a flag names another (a warning then says so);
- the VM size: its family, vCPUs and GPUs, from Azure's list of sizes of that region, and whether a
  node has a GPU (decided from the size's name where the list lacks it, never silently "no");
- the vCPU quota of that family in that region, which Azure keeps per family and region
  (learn.microsoft.com/azure/machine-learning/how-to-manage-quotas): a cluster needs nodes x vCPUs,
  a managed online deployment instances x vCPUs plus Azure's 20% reserve for upgrades.

A check that fails stops the script with one line before anything exists: short quota, a size the
region does not offer, a family absent from the region's quota list. A list that cannot be read
(permissions) is said in one line and the script goes on without that check.
"""

import math
import re
import sys
from dataclasses import dataclass

from azure.core.exceptions import AzureError, ResourceNotFoundError

import config
from azure_steps.client import state_text
from azure_steps.prices import cost_per_hour

QUOTA_PAGE = "https://ml.azure.com/quota"
# Managed online deployments reserve 20% more instances than they run, rounded up, for upgrades
# (how-to-manage-quotas: 10 instances of a 4-vCPU size reserve 48 vCPUs).
DEPLOYMENT_RESERVE = 0.2
# Azure's VM size names: Standard_ (or Basic_), then the series. The N-series (NC, ND, NV, ...) have GPUs;
# these series letters are CPU-only (A, B, D and DC, E and EC, F, G, H, L, M); anything else is unknown.
# Azure's rule for endpoint names (learn.microsoft.com/azure/machine-learning/how-to-manage-quotas): a letter,
# then 3-32 letters, digits and single dashes.
ENDPOINT_NAME = re.compile(r"[A-Za-z](?!.*--)[A-Za-z0-9-]{2,31}")
SIZE_NAME = re.compile(r"(?i)(standard|basic)_([a-z])")
CPU_SERIES = set("abdefghlm")


@dataclass(frozen=True)
class SizeFacts:
    """One VM size as Azure lists it in a region; None where the list does not say."""

    name: str
    family: str | None
    vcpus: int | None
    gpus: int | None


def field(entity, name: str, rest_name: str):
    """An attribute of an azure-ai-ml entity built from a REST object.

    azure-ai-ml 1.35's Usage and VmSize copy the REST model's dict into themselves, so a listed
    object carries `currentValue` and `vCPUs` where the documented ones (`current_value`, `v_cp_us`)
    stay None; an object built by hand carries the documented ones. Either is read.
    """
    value = getattr(entity, name, None)
    return getattr(entity, rest_name, None) if value is None else value


def workspace_location(ml_client, workspace_name: str) -> str:
    """The workspace's region, where its clusters and endpoints go by default."""
    return ml_client.workspaces.get(workspace_name).location


def same_region(a: str | None, b: str | None) -> bool:
    """Whether two region names are one region ("East US 2" and "eastus2" are)."""
    return (a or "").replace(" ", "").lower() == (b or "").replace(" ", "").lower()


def choose_location(ml_client, workspace_name: str, requested: str | None, script: str) -> str:
    """The requested region, or the workspace's; a region other than the workspace's is warned about."""
    home = workspace_location(ml_client, workspace_name)
    if not requested:
        return home
    if not same_region(requested, home):
        print(f"{script}: warning: --location {requested} is not the workspace's region ({home}); the cluster's "
              "data and logs cross regions, and its quota is that region's")
    return requested


def first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def size_facts(ml_client, size: str, location: str, script: str, listed_or_stop=True) -> SizeFacts:
    """Family, vCPUs and GPUs of `size` in `location`, from Azure's list of sizes for compute clusters; stops when
    the region does not offer it (unless not `listed_or_stop`: managed endpoints keep a list of their own).

    A list that cannot be read leaves them all None (unknown), said in one line.
    """
    try:
        sizes = list(ml_client.compute.list_sizes(location=location))
    except AzureError as e:
        print(f"{script}: could not read Azure's list of VM sizes for {location} ({first_line(e)}); going on "
              f"without checking that {location} offers {size}")
        return SizeFacts(size, None, None, None)
    for listed in sizes:
        if (listed.name or "").lower() == size.lower():
            return SizeFacts(listed.name, listed.family, field(listed, "v_cp_us", "vCPUs"), listed.gpus)
    if not listed_or_stop:
        return SizeFacts(size, None, None, None)
    sys.exit(f"{script}: {location} does not offer {size} (it is not in Azure's list of VM sizes there); "
             "check the size's name, or choose another size or region")


def has_gpu(facts: SizeFacts) -> tuple[bool, str]:
    """Whether a node of this size has a GPU, and why; a size that cannot be classified counts as one."""
    if facts.gpus:
        return True, f"{facts.name} has {facts.gpus} GPU(s)"
    series = SIZE_NAME.match(facts.name)
    if series and series.group(2).lower() == "n":
        return True, f"{facts.name} is an N-series (GPU) size"
    if series and facts.gpus == 0:
        return False, f"{facts.name} has no GPU"
    if series and series.group(2).lower() in CPU_SERIES:
        return False, f"{facts.name} is of a CPU-only series"
    return True, f"{facts.name} cannot be classified as a GPU or CPU size, so the GPU check stays on"


def cluster_vcpus(nodes: int, facts: SizeFacts) -> int:
    return nodes * (facts.vcpus or 0)


def deployment_vcpus(instances: int, facts: SizeFacts) -> int:
    """vCPUs a managed online deployment takes from the quota, with Azure's 20% reserve."""
    return math.ceil(instances * (1 + DEPLOYMENT_RESERVE) - 1e-9) * (facts.vcpus or 0)


def usage_names(usage) -> tuple[str, str]:
    """A Usage's name value and label (`name` is a dict in a listed Usage, a UsageName in one built by hand)."""
    name = usage.name
    if isinstance(name, dict):
        return name.get("value") or "", name.get("localizedValue") or name.get("localized_value") or ""
    return getattr(name, "value", None) or "", getattr(name, "localized_value", None) or ""


def subscription_usage(usages, wanted) -> list:
    """The subscription's dedicated-vCPU entries for which wanted(value, label) holds.

    One list holds the subscription's entries, each workspace's share (`/workspaces/` in the id) and the
    low-priority ones under the same names; clusters here are dedicated, so only those count.
    """
    found = []
    for usage in usages:
        value, label = usage_names(usage)
        scope = f"{usage.type or ''} {usage.id or ''}".lower()
        if "/workspaces/" in scope or "lowpriority" in f"{scope} {value} {label}".replace(" ", "").lower():
            continue
        if wanted(value.lower(), label.lower()):
            found.append(usage)
    return found


def letters_and_digits(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def names_family(value: str, label: str, family: str) -> bool:
    """Whether a quota entry is the family's: its name is the family ("standardDSv2Family"), or its label
    begins with it ("Standard DSv2 Family Cluster Dedicated vCPUs", as in Microsoft's Usage/list.json example)."""
    wanted = letters_and_digits(family)
    return any(name == wanted or name.startswith(wanted + "cluster")
               for name in (letters_and_digits(value), letters_and_digits(label)))


def quota_entries(usages, family: str) -> list:
    """The family's entry and the region's total of dedicated vCPUs, those of them the list has."""
    usages = list(usages)
    family_entry = subscription_usage(usages, lambda value, label: names_family(value, label, family))
    total = subscription_usage(usages, lambda value, label: "total" in label and "dedicated" in label)
    return [(family, entry) for entry in family_entry[:1]] + [("all families", entry) for entry in total[:1]]


def check_quota(ml_client, location: str, facts: SizeFacts, needed: int, what: str, script: str) -> None:
    """Stop with one line unless the family of `facts` has `needed` free vCPUs in `location`."""
    if not facts.family or not facts.vcpus:
        print(f"{script}: the family and vCPUs of {facts.name} are unknown, so its quota cannot be checked; "
              f"going on (see {QUOTA_PAGE})")
        return
    if needed <= 0:
        return
    try:
        usages = list(ml_client.compute.list_usage(location=location))
    except AzureError as e:
        print(f"{script}: could not read Azure's quota list for {location} ({first_line(e)}); going on without "
              "the quota check")
        return
    if not usages:
        print(f"{script}: Azure's quota list for {location} is empty; going on without the quota check")
        return
    entries = quota_entries(usages, facts.family)
    if not entries or entries[0][0] != facts.family:
        sys.exit(f"{script}: {location} has no quota for {facts.family} ({facts.name}'s family is not in Azure's "
                 f"quota list there), so {what} cannot be created; choose another region or size, or see {QUOTA_PAGE}")
    for scope, usage in entries:
        limit, used = usage.limit, field(usage, "current_value", "currentValue") or 0
        if limit is None or limit < 0:  # -1: unlimited
            continue
        free = max(0, limit - used)
        if needed > free:
            sys.exit(
                f"{script}: not enough quota for {what}: {scope} in {location} needs {needed} vCPUs, "
                f"{free} available ({used} of {limit} in use); request more at {QUOTA_PAGE} (Quota, the "
                "subscription, the family, Request quota), or choose another size or region"
            )
    print(f"Quota: {what} needs {needed} {facts.family} vCPUs in {location}; there is room.")


@dataclass(frozen=True)
class ClusterPlan:
    """The cluster a job will run on, as the pre-flight found it, before anything is created."""

    name: str
    size: SizeFacts
    location: str
    nodes: int
    existing: object | None  # the workspace's AmlCompute of that name, reused
    gpu: bool  # whether the job must stop when torch sees no GPU


def find_cluster(ml_client, compute_name):
    """The workspace's cluster of that name, or None."""
    try:
        return ml_client.compute.get(compute_name)
    except ResourceNotFoundError:
        return None


def plan_cluster(ml_client, compute_name, instance_type, requested_location, nodes) -> ClusterPlan:
    """The cluster's region, size, GPUs and quota; stops with one line where the job could not run."""
    script = "setup_ml.py"
    existing = find_cluster(ml_client, compute_name)
    if existing is not None:
        location = existing.location or workspace_location(ml_client, config.AZURE_ML_WORKSPACE_NAME)
        if requested_location and not same_region(requested_location, location):
            print(f"{script}: warning: cluster '{compute_name}' exists in {location}; --location "
                  f"{requested_location} applies to a new cluster only")
        instance_type = existing.size
    else:
        location = choose_location(ml_client, config.AZURE_ML_WORKSPACE_NAME, requested_location, script)
    facts = size_facts(ml_client, instance_type, location, script)
    # Quota is taken by allocated nodes only, so a reused cluster holds just the nodes it has now.
    held = len(list(ml_client.compute.list_nodes(compute_name))) if existing is not None else 0
    check_quota(ml_client, location, facts, cluster_vcpus(max(0, nodes - held), facts),
                f"cluster '{compute_name}' ({nodes} x {facts.name})", script)
    gpu, why = has_gpu(facts)
    if gpu and not facts.gpus:
        print(f"{script}: {why}; the job passes --require_gpu")
    if existing is not None and (existing.min_instances or 0) > 0:
        print(f"{script}: warning: cluster '{compute_name}' keeps {existing.min_instances} node(s) running "
              f"while idle (min_instances={existing.min_instances}), which bills "
              f"{cost_per_hour(existing.size, existing.min_instances)} whether a job runs or not; set its "
              "minimum nodes to 0 in the studio (Compute > Compute clusters > Edit)")
    return ClusterPlan(compute_name, facts, location, nodes, existing, gpu)


def check_deployment_quota(ml_client, deployment) -> None:
    """Stop with one line unless the deployment's VM family has the vCPUs it takes, with Azure's reserve."""
    location = workspace_location(ml_client, config.AZURE_ML_WORKSPACE_NAME)
    facts = size_facts(ml_client, deployment.instance_type, location, "deploy_model.py", listed_or_stop=False)
    held = 0  # an update in place of a deployment of the same size needs no more than it holds
    try:
        existing = ml_client.online_deployments.get(deployment.name, deployment.endpoint_name)
        same_size = (existing.instance_type or "").lower() == deployment.instance_type.lower()
        if same_size and state_text(existing.provisioning_state).lower() != "failed":  # a Failed one is deleted first
            held = deployment_vcpus(existing.instance_count or 0, facts)
    except ResourceNotFoundError:
        pass
    check_quota(ml_client, location, facts, deployment_vcpus(deployment.instance_count, facts) - held,
                f"deployment {deployment.name} ({deployment.instance_count} x {deployment.instance_type} and Azure's "
                "20% reserve)", "deploy_model.py")


def check_endpoint_name(name):
    """Stop with one line unless `name` follows Azure's rule for endpoint names (ENDPOINT_NAME)."""
    if not ENDPOINT_NAME.fullmatch(name):
        sys.exit(f"deploy_model.py: AZURE_ENDPOINT_NAME '{name}' is not a valid endpoint name: use 3-32 letters, "
                 "digits and single hyphens, starting with a letter (e.g. finetune-phi-endpoint)")
