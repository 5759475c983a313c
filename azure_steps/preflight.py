"""What setup_ml.py and deploy_model.py check before they create or bill anything.

- the region: the workspace's, unless a flag names another (a warning then says so);
- the VM size: its family, vCPUs and GPUs, from Azure's list of sizes of that region, and whether a
  node has a GPU (decided from the size's name where the list lacks it, never silently "no");
- the vCPU quota of that family in that region, which Azure keeps per family and region
  (learn.microsoft.com/azure/machine-learning/how-to-manage-quotas): a cluster needs nodes x vCPUs,
  a managed online deployment instances x vCPUs plus Azure's 20% reserve for upgrades.

A check that fails stops the script with one line before anything exists; a quota list that cannot
be read (permissions) is said in one line and the script goes on.
"""

import math
import re
import sys
from dataclasses import dataclass

from azure.core.exceptions import AzureError

QUOTA_PAGE = "https://ml.azure.com/quota"
# Managed online deployments reserve 20% more instances than they run, rounded up, for upgrades
# (how-to-manage-quotas: 10 instances of a 4-vCPU size reserve 48 vCPUs).
DEPLOYMENT_RESERVE = 0.2
# Azure's VM size names: Standard_ (or Basic_), then the series. The N-series (NC, ND, NV, ...) have GPUs;
# these series letters are CPU-only (A, B, D and DC, E and EC, F, G, H, L, M); anything else is unknown.
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


def size_facts(ml_client, size: str, location: str) -> SizeFacts:
    """Family, vCPUs and GPUs of `size` in `location`, from Azure's list (all None if it is not listed)."""
    for listed in ml_client.compute.list_sizes(location=location):
        if (listed.name or "").lower() == size.lower():
            return SizeFacts(listed.name, listed.family, field(listed, "v_cp_us", "vCPUs"), listed.gpus)
    return SizeFacts(size, None, None, None)


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


def quota_entries(usages, family: str) -> list:
    """The family's entry and the region's total of dedicated vCPUs, those of them the list has."""
    usages = list(usages)
    family_entry = subscription_usage(usages, lambda value, label: value == family.lower())
    total = subscription_usage(usages, lambda value, label: "total" in label and "dedicated" in label)
    return [(family, entry) for entry in family_entry[:1]] + [("all families", entry) for entry in total[:1]]


def check_quota(ml_client, location: str, facts: SizeFacts, needed: int, what: str, script: str) -> None:
    """Stop with one line unless the family of `facts` has `needed` free vCPUs in `location`."""
    if not facts.family or not facts.vcpus:
        print(f"{script}: {facts.name} is not in {location}'s list of VM sizes, so its quota cannot be checked; "
              f"going on (check the size's name and region, and {QUOTA_PAGE})")
        return
    if needed <= 0:
        return
    try:
        entries = quota_entries(ml_client.compute.list_usage(location=location), facts.family)
    except AzureError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{script}: could not read Azure's quota list for {location} ({reason}); going on without the "
              "quota check")
        return
    if not entries or entries[0][0] != facts.family:
        print(f"{script}: Azure's quota list for {location} has no entry for {facts.family}; going on "
              "without its quota check")
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
