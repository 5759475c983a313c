"""What in the Azure ML workspace bills now, and what each costs an hour.

Lists the workspace's managed online endpoints with their deployments (VM size and instance count,
billed for as long as they exist, called or not), its compute clusters with their current and
minimum nodes (a cluster bills for the nodes it has; min_instances above 0 keeps them while idle),
and compute instances in every state but Stopped and CreateFailed (a starting, running or failing
instance holds its VM). Prices are list prices with their date (azure_steps/prices.py).

    python -m azure_steps.billing
"""

import argparse
import sys
from contextlib import contextmanager

from azure.core.exceptions import HttpResponseError

from azure_steps.client import azure_reason, get_ml_client, state_text
from azure_steps.prices import PRICES_AS_OF, PRICE_REGION, REGISTRY_USD_PER_DAY, cost_per_hour, hourly

# Azure ML's compute instance states (ComputeInstanceState in azure-ai-ml's REST models) in which no VM
# is held: every other one (Creating, Starting, Running, JobRunning, SettingUp, Restarting, Stopping, ...)
# bills the VM (docs/azure-runtime.md, "What it costs").
INSTANCE_STATES_NOT_BILLED = {"stopped", "createfailed"}


def deployment_rows(ml_client, endpoint_name: str) -> list[tuple[str, float | None]]:
    """One row per deployment of the endpoint: what it is, and its US$/h (None when the price is unknown)."""
    rows = []
    for deployment in ml_client.online_deployments.list(endpoint_name):
        count = deployment.instance_count or 0
        state = f", {state_text(deployment.provisioning_state)}" if deployment.provisioning_state else ""
        rows.append((f"endpoint {endpoint_name}, deployment {deployment.name}{state}: "
                     f"{cost_per_hour(deployment.instance_type, count)}", rate(deployment.instance_type, count)))
    if not rows:
        rows.append((f"endpoint {endpoint_name}: no deployment (an endpoint alone bills nothing)", 0.0))
    return rows


def cluster_rows(ml_client) -> list[tuple[str, float | None]]:
    """Clusters, with their nodes now and their minimum; running compute instances."""
    rows = []
    for compute in ml_client.compute.list():
        kind = state_text(compute.type).lower()
        if kind == "amlcompute":
            nodes = len(list(ml_client.compute.list_nodes(compute.name)))
            minimum = compute.min_instances or 0
            keeps = f"; min_instances={minimum} keeps them while idle" if minimum else ""
            rows.append((f"cluster {compute.name}: {nodes} node(s) now{keeps}: {cost_per_hour(compute.size, nodes)}",
                         rate(compute.size, nodes)))
        elif kind == "computeinstance" and state_text(compute.state).lower() not in INSTANCE_STATES_NOT_BILLED:
            rows.append((f"compute instance {compute.name}, {state_text(compute.state) or 'state unknown'}: "
                         f"{cost_per_hour(compute.size)}", rate(compute.size, 1)))
    return rows


def rate(size: str, count: float) -> float | None:
    price = hourly(size)
    return None if price is None else price * count


def billing_rows(ml_client) -> list[tuple[str, float | None]]:
    rows = []
    for endpoint in ml_client.online_endpoints.list():
        rows += deployment_rows(ml_client, endpoint.name)
    return rows + cluster_rows(ml_client)


def print_billing(rows) -> None:
    for text, _ in rows:
        print(f"  {text}")
    known = sum(r for _, r in rows if r)
    unknown = " plus the sizes whose price is not in the table" if any(r is None for _, r in rows) else ""
    print(f"Now: US${known:,.2f}/h{unknown} (US${known * 24:,.2f} a day), {PRICE_REGION} list prices "
          f"{PRICES_AS_OF}; storage and the container registry come on top: "
          + ", ".join(f"US${price}/day if {tier}" for tier, price in REGISTRY_USD_PER_DAY.items())
          + " (docs/azure-runtime.md)")


def print_what_still_bills(ml_client, endpoint_name, delete_command) -> None:
    """What an endpoint still holds, each with its price an hour, and the command that removes it."""
    try:
        rows = deployment_rows(ml_client, endpoint_name)
    except HttpResponseError as e:
        rows = [(f"endpoint {endpoint_name} (its deployments could not be listed: {str(e).strip()[:120]})", None)]
    print("Still in the workspace, billing until deleted:\n" + "".join(f"  {text}\n" for text, _ in rows)
          + f"Remove it: {delete_command}", flush=True)


def print_endpoint_bill(ml_client, endpoint_name, delete_command):
    """The end of a deployment: every deployment the endpoint holds, its price, and how to stop it."""
    rows = deployment_rows(ml_client, endpoint_name)
    total = sum(price or 0 for _, price in rows)
    print(f"Done. Endpoint {endpoint_name} now bills US${total:,.2f}/h (US${total * 24:,.2f} a day), called or "
          f"not, for its {len(rows)} deployment(s):\n" + "".join(f"  {text}\n" for text, _ in rows)
          + f"until you run `{delete_command}`.")


@contextmanager
def told_what_bills_if_stopped(ml_client, endpoint_name, delete_command):
    """Around the endpoint's creation: stopped by Ctrl-C or an error, say what bills on and how to delete it."""
    try:
        yield
    except (KeyboardInterrupt, HttpResponseError, SystemExit) as stop:
        if isinstance(stop, KeyboardInterrupt):
            print("\nStopped waiting; Azure goes on creating what was asked.", file=sys.stderr)
        print_what_still_bills(ml_client, endpoint_name, delete_command)
        if isinstance(stop, SystemExit):
            raise
        sys.exit(130 if isinstance(stop, KeyboardInterrupt) else f"deploy_model.py: {azure_reason(stop)}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    return parser.parse_args(argv)


def main(argv=None):
    parse_args(argv)
    ml_client = get_ml_client()
    try:
        rows = billing_rows(ml_client)
    except HttpResponseError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        sys.exit(f"azure_steps.billing: could not list the workspace's endpoints and computes ({reason})")
    print("What bills in the workspace now:" if rows else "Nothing in the workspace bills by the hour now.")
    print_billing(rows)
    print("Undo: python deploy_model.py --delete --yes (and --rehearsal --delete --yes) for endpoints; a cluster's "
          "minimum nodes to 0 (or delete it) and stop compute instances in the studio (Compute)")
    return rows


if __name__ == "__main__":
    main()
