"""What the Azure resources of the collection cost, so that every script can say it in dollars.

Pay-as-you-go list prices for Linux VMs, in US dollars an hour, as Azure published them on the date
below; they differ by region and change over time: the Azure pricing calculator has today's.
"""

PRICES_AS_OF = "2026-11"
PRICE_SOURCE = "https://azure.microsoft.com/pricing/details/virtual-machines/linux/"
PRICE_REGION = "East US"
CALCULATOR = "https://azure.microsoft.com/pricing/calculator/"

# docs/azure-runtime.md ("What it costs") gives each price's source.
HOURLY_USD = {
    "Standard_NC24ads_A100_v4": 3.67,  # the A100 job
    "Standard_E16s_v3": 1.008,  # the tutorial's CPU profile (--cpu)
    "Standard_E4s_v3": 0.25,  # the deployment
    "Standard_DS3_v2": 0.29,  # the rehearsal's cluster
    "Standard_DS2_v2": 0.146,  # the rehearsal's deployment, one size up
    "Standard_DS1_v2": 0.07,  # the rehearsal's deployment
}

# The workspace's container registry, a day: the first environment build creates a Basic one; a workspace
# made from Azure's quickstart template (machine-learning-workspace) has a Standard one (docs/azure-runtime.md).
REGISTRY_USD_PER_DAY = {"Basic": 0.167, "Standard": 0.667}


def hourly(size: str) -> float | None:
    """The list price of one VM of `size` an hour, or None when the table does not have it."""
    return next((price for name, price in HOURLY_USD.items() if name.lower() == (size or "").lower()), None)


def cost_per_hour(size: str, count: float = 1) -> str:
    """`count` VMs of `size` an hour, as a person reads it, with the price's date."""
    price = hourly(size)
    if price is None:
        return f"price of {size} not in this collection's table; see {CALCULATOR}"
    return f"US${price * count:,.2f}/h ({count:g} x {size}, {PRICE_REGION} list price {PRICES_AS_OF})"


def cost_per_day(size: str, count: float = 1) -> str:
    """`count` VMs of `size` for a day, as ", US$X a day", or nothing when the price is unknown."""
    price = hourly(size)
    return "" if price is None else f", US${price * count * 24:,.2f} a day"


def cost_for(size: str, hours: float, count: float = 1) -> str:
    """`count` VMs of `size` for `hours`, e.g. the most a job can cost before its time limit stops it."""
    price = hourly(size)
    if price is None:
        return f"{hours:g} h of {count:g} x {size} (price not in this collection's table; see {CALCULATOR})"
    return f"US${price * count * hours:,.2f} ({hours:g} h x {count:g} x {size} at US${price:.2f}/h, " \
           f"{PRICE_REGION} list price {PRICES_AS_OF})"
