"""Synthetic lead-conversion data for N enterprises, each in its own CRM dialect.

Why this exists: a federated CRM model has to cope with two things real tenants
bring and public data sets lack - every enterprise exports its Salesforce-style
leads with its *own* column names, picklist spellings, boolean words and units,
and every enterprise sees a *different* slice of the market (non-IID). This
module produces such a federation deterministically, so demos, tests and
benchmarks can exercise the whole manifest -> mapping -> training path.

Canonical record (target ``converted``: the lead became a won opportunity)
---------------------------------------------------------------------------
``lead_source``, ``industry``, ``region`` (categorical), ``company_size``
(employees, lognormal, median ~200), ``annual_revenue`` (USD, company size times
a lognormal revenue per employee, so the two are correlated), ``email_opens``,
``web_visits``, ``meetings_held`` (counts driven by a latent engagement),
``days_since_last_activity`` (whole days), ``open_cases`` (open service cases),
``opportunity_amount`` (USD), ``budget_confirmed`` and ``escalated_case``
(booleans).

Label model (one P(y | x), shared by every client and by the test set)
-----------------------------------------------------------------------
::

    eta =  SOURCE[lead_source] + INDUSTRY[industry] + REGION[region]
         + 0.30 * (log1p(company_size) - log(201))
         + 2.00 * (1 - exp(-email_opens / 4)) - 1.0      # saturating: the 20th open adds little
         + 0.20 * log1p(web_visits)
         + 0.35 * min(meetings_held, 8)
         + 0.55 * min(meetings_held, 8) * budget_confirmed # meetings only pay off with a budget
         + 1.20 * budget_confirmed
         - 1.80 * [days_since_last_activity > 30]         # a lead that went cold
         - 0.012 * min(days_since_last_activity, 180)
         - 0.40 * open_cases - 1.10 * escalated_case
         - 0.35 * (log1p(opportunity_amount) - log(25001))
    logit = LABEL_SCALE * eta + LABEL_INTERCEPT
    converted ~ Bernoulli(sigmoid(logit))

``SOURCE``, ``INDUSTRY`` and ``REGION`` are the tables ``_SOURCE_EFFECT``,
``_INDUSTRY_EFFECT`` and ``_REGION_EFFECT`` below. ``LABEL_SCALE`` and
``LABEL_INTERCEPT`` are set so that, on the (un-resampled) pooled population,
the Bayes classifier ``p > 0.5`` is right about 90% of the time and about a
third of leads convert. :func:`conversion_probability` evaluates the model.

Non-IID clients (Dirichlet ``alpha``: small = skewed, large = near IID)
-----------------------------------------------------------------------
* Feature shift: each client draws its lead-source, industry and region mixes
  from ``Dirichlet(alpha * K * base_mix)`` (K = number of categories), a
  company-size scale (lognormal) and an engagement offset; all features are
  drawn conditionally on these.
* Label skew: each client draws a target positive rate, the first component of
  ``Dirichlet(2 * alpha * (p0, 1 - p0))`` clipped to [0.1, 0.7], with ``p0`` the
  population's conversion rate, and its leads' engagement is shifted until they
  convert at that rate (:func:`_calibrate`). Labels are never resampled, so
  P(y | x) stays shared while P(y) and P(x) differ.
* The held-out ``test.csv`` draws from every client's feature distribution in
  proportion to its rows, labelled by the shared model and not resampled.

Dialects: each client's local schema varies column names (``LeadSource``,
``Source__c``, ``Lead Source`` ...), picklist spellings (``Web``, ``WEB``,
``Website``, ``cold-call`` ...), boolean words (``Yes``/``No``, ``Y``/``N``,
``1``/``0``, target ``Won``/``Lost``, ``Closed Won``/``Open`` ...), units (revenue
in thousands, inactivity in weeks or hours), leaves out some canonical columns,
adds unmapped CRM noise columns (``OwnerEmail``, ``Notes`` ...) and blanks 2-4%
of feature cells. Choices rotate with the client index (with a seed-dependent
offset) so any 4 consecutive clients already show every kind of difference.
The generated Participant manifest maps it all back to the canonical schema.

Randomness: ``SeedSequence(seed)`` is spawned into one child for the
federation-level choices, one for the test set and one per client (child
``2 + i``), each driving ``Generator(PCG64(...))``; the same arguments give
byte-identical files, and client ``i`` gets the same data whatever ``clients``
is (for equal ``rows``, ``alpha`` and ``seed``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from fedcrm.errors import FedcrmError
from fedcrm.spec.loading import dump_manifest
from fedcrm.spec.manifests import (
    DataSource,
    Feature,
    FeatureType,
    Federation,
    FederationRef,
    FederationSpec,
    FileSource,
    ModelSpec,
    ObjectMeta,
    Participant,
    ParticipantSpec,
    ParticipantsSpec,
    Privacy,
    SecureAggregation,
    Task,
    Training,
    Transform,
    ValueTransform,
)

__all__ = [
    "LEAD_CONVERSION_TASK",
    "SynthResult",
    "canonical_task",
    "conversion_probability",
    "generate_federation",
]

FEDERATION_NAME = "lead-conversion"
FEDERATION_NAMESPACE = "fedcrm-system"

# --------------------------------------------------------------------------- canonical schema

_SOURCES = ["web", "referral", "partner", "event", "cold_call", "advertisement"]
_INDUSTRIES = ["technology", "finance", "healthcare", "retail", "manufacturing", "education"]
_REGIONS = ["north_america", "emea", "apac", "latam"]

LEAD_CONVERSION_TASK = Task(
    target="converted",
    description="Predict whether a CRM lead becomes a won opportunity.",
    features=[
        Feature(name="lead_source", type=FeatureType.categorical, categories=_SOURCES,
                description="Channel the lead came from."),
        Feature(name="industry", type=FeatureType.categorical, categories=_INDUSTRIES,
                description="Industry of the lead's company."),
        Feature(name="region", type=FeatureType.categorical, categories=_REGIONS,
                description="Sales region of the lead's company."),
        # bound: where each value is clipped for the (noised, under DP) preprocessing statistics only; about the
        # 99.5th percentile of this generator's values, so that DP noise on the means and scales stays small.
        Feature(name="company_size", type=FeatureType.numeric, transform=Transform.log1p,
                bound=12.0, description="Number of employees at the lead's company."),
        Feature(name="annual_revenue", type=FeatureType.numeric, transform=Transform.log1p,
                bound=25.0, description="Company's annual revenue in USD."),
        Feature(name="email_opens", type=FeatureType.numeric,
                bound=50.0, description="Marketing e-mails opened in the last 90 days."),
        Feature(name="web_visits", type=FeatureType.numeric,
                bound=30.0, description="Visits to the company website in the last 90 days."),
        Feature(name="meetings_held", type=FeatureType.numeric,
                bound=12.0, description="Sales meetings held with the lead."),
        Feature(name="days_since_last_activity", type=FeatureType.numeric,
                bound=180.0, description="Days since the last logged activity on the lead."),
        Feature(name="open_cases", type=FeatureType.numeric,
                bound=5.0, description="Open service cases for the lead's account."),
        Feature(name="opportunity_amount", type=FeatureType.numeric, transform=Transform.log1p,
                bound=15.0, description="Expected deal size in USD."),
        Feature(name="budget_confirmed", type=FeatureType.boolean,
                description="The lead has confirmed a budget for the purchase."),
        Feature(name="escalated_case", type=FeatureType.boolean,
                description="The account has at least one escalated service case."),
    ],
)

_TARGET = LEAD_CONVERSION_TASK.target
_FEATURES = [f.name for f in LEAD_CONVERSION_TASK.features]
_CATEGORICAL = {"lead_source": _SOURCES, "industry": _INDUSTRIES, "region": _REGIONS}
_BOOLEAN = ["budget_confirmed", "escalated_case"]
_NUMERIC = [n for n in _FEATURES if n not in _CATEGORICAL and n not in _BOOLEAN]

# --------------------------------------------------------------------------- population and label model

_BASE_SOURCE_MIX = np.array([0.30, 0.14, 0.12, 0.12, 0.17, 0.15])
_BASE_INDUSTRY_MIX = np.array([0.25, 0.18, 0.15, 0.15, 0.17, 0.10])
_BASE_REGION_MIX = np.array([0.40, 0.30, 0.20, 0.10])

# Engagement differs by channel: referrals and event leads answer; cold calls rarely do.
_SOURCE_ENGAGEMENT = np.array([0.1, 0.3, 0.2, 0.4, -0.4, -0.1])
# Industry shifts headcount and revenue per employee (log scale).
_INDUSTRY_SIZE = np.array([0.0, 0.4, 0.3, 0.2, 0.5, -0.2])
_INDUSTRY_REVENUE = np.array([0.3, 0.6, 0.0, -0.4, 0.0, -0.6])

_SOURCE_EFFECT = {"web": 0.0, "referral": 1.1, "partner": 0.7, "event": 0.4, "cold_call": -0.9, "advertisement": -0.4}
_INDUSTRY_EFFECT = {"technology": 0.35, "finance": 0.2, "healthcare": -0.1, "retail": -0.25,
                    "manufacturing": 0.1, "education": -0.45}
_REGION_EFFECT = {"north_america": 0.15, "emea": 0.0, "apac": -0.1, "latam": -0.3}

LABEL_SCALE = 2.2
LABEL_INTERCEPT = -4.0


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def conversion_probability(frame: pd.DataFrame) -> np.ndarray:
    """P(converted | features) under the shared label model, one value per row.

    ``frame`` is in the canonical schema with complete feature values (booleans
    as bool or 1.0/0.0). Thresholding it at 0.5 is the Bayes classifier, the
    ceiling any learned model can reach; tests and benchmarks compare with it.
    Missing values raise :class:`ValueError`: the model is defined on complete
    rows only, and silently imputing would make the ceiling a guess.
    """
    missing = [n for n in _FEATURES if n not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks canonical feature columns: {', '.join(missing)}")
    eta = np.zeros(len(frame))
    for name, table in (("lead_source", _SOURCE_EFFECT), ("industry", _INDUSTRY_EFFECT), ("region", _REGION_EFFECT)):
        effect = frame[name].map(table).to_numpy(dtype="float64", na_value=np.nan)
        if np.isnan(effect).any():
            raise ValueError(f"column {name!r} has missing or unknown values")
        eta += effect

    def num(name: str) -> np.ndarray:
        values = frame[name].to_numpy(dtype="float64", na_value=np.nan)
        if np.isnan(values).any():
            raise ValueError(f"column {name!r} has missing values")
        return values

    meetings = np.minimum(num("meetings_held"), 8.0)
    budget = num("budget_confirmed")
    days = num("days_since_last_activity")
    eta += 0.30 * (np.log1p(num("company_size")) - math.log(201.0))
    eta += 2.00 * (1.0 - np.exp(-num("email_opens") / 4.0)) - 1.0
    eta += 0.20 * np.log1p(num("web_visits"))
    eta += 0.35 * meetings + 0.55 * meetings * budget
    eta += 1.20 * budget
    eta -= 1.80 * (days > 30) + 0.012 * np.minimum(days, 180.0)
    eta -= 0.40 * num("open_cases") + 1.10 * num("escalated_case")
    eta -= 0.35 * (np.log1p(num("opportunity_amount")) - math.log(25001.0))
    # annual_revenue carries no direct effect: it is informative only through company_size,
    # a realistic redundant feature.
    num("annual_revenue")
    return _sigmoid(LABEL_SCALE * eta + LABEL_INTERCEPT)


@dataclass(frozen=True)
class _Profile:
    """One client's slice of the market: what its leads look like and how many convert."""

    source_mix: np.ndarray
    industry_mix: np.ndarray
    region_mix: np.ndarray
    size_scale: float
    engagement: float
    target_rate: float


# The population's conversion rate (measured on the un-resampled pooled draws, seeds 0-3).
_NATURAL_RATE = 0.34


def _dirichlet(rng: np.random.Generator, alpha: float, base: np.ndarray) -> np.ndarray:
    mix = rng.dirichlet(alpha * len(base) * base)
    mix = np.nan_to_num(mix, nan=0.0)
    if mix.sum() <= 0:  # all mass underflowed: fall back to one category
        mix = np.zeros_like(base)
        mix[int(rng.integers(len(base)))] = 1.0
    return mix / mix.sum()


def _draw_profile(rng: np.random.Generator, alpha: float) -> _Profile:
    return _Profile(
        source_mix=_dirichlet(rng, alpha, _BASE_SOURCE_MIX),
        industry_mix=_dirichlet(rng, alpha, _BASE_INDUSTRY_MIX),
        region_mix=_dirichlet(rng, alpha, _BASE_REGION_MIX),
        size_scale=float(np.exp(rng.normal(0.0, 0.6))),
        engagement=float(rng.normal(0.0, 0.3)),
        target_rate=float(np.clip(rng.dirichlet([2 * alpha * _NATURAL_RATE, 2 * alpha * (1 - _NATURAL_RATE)])[0], 0.1, 0.7)),
    )


def _draw_leads(rng: np.random.Generator, profile: _Profile, n: int) -> pd.DataFrame:
    """``n`` complete canonical rows from ``profile``, labelled by the shared model."""
    src = rng.choice(len(_SOURCES), size=n, p=profile.source_mix)
    ind = rng.choice(len(_INDUSTRIES), size=n, p=profile.industry_mix)
    reg = rng.choice(len(_REGIONS), size=n, p=profile.region_mix)

    log_size = math.log(200.0 * profile.size_scale) + _INDUSTRY_SIZE[ind] + rng.normal(0.0, 1.1, n)
    company_size = np.maximum(1.0, np.round(np.exp(log_size)))
    revenue_per_employee = np.exp(math.log(120_000.0) + _INDUSTRY_REVENUE[ind] + rng.normal(0.0, 0.45, n))
    annual_revenue = np.round(company_size * revenue_per_employee)
    size_z = np.log(company_size) - math.log(200.0)

    z = rng.normal(0.0, 1.0, n) + _SOURCE_ENGAGEMENT[src] + profile.engagement
    email_opens = rng.poisson(4.0 * np.exp(0.6 * z)).astype("float64")
    web_visits = rng.poisson(3.0 * np.exp(0.5 * z + rng.normal(0.0, 0.3, n))).astype("float64")
    meetings_held = rng.poisson(0.8 * np.exp(0.7 * z)).astype("float64")
    days = np.round(rng.exponential(20.0 * np.exp(-0.5 * z)))
    budget = rng.random(n) < _sigmoid(-1.0 + 0.9 * z + 0.3 * size_z)
    open_cases = rng.poisson(0.25 * np.exp(0.3 * size_z)).astype("float64")
    escalated = (open_cases > 0) & (rng.random(n) < 0.35)
    amount = np.round(np.exp(math.log(25_000.0) + 0.45 * size_z + rng.normal(0.0, 0.6, n)))

    frame = pd.DataFrame({
        "lead_source": np.array(_SOURCES, dtype=object)[src],
        "industry": np.array(_INDUSTRIES, dtype=object)[ind],
        "region": np.array(_REGIONS, dtype=object)[reg],
        "company_size": company_size,
        "annual_revenue": annual_revenue,
        "email_opens": email_opens,
        "web_visits": web_visits,
        "meetings_held": meetings_held,
        "days_since_last_activity": days,
        "open_cases": open_cases,
        "opportunity_amount": amount,
        "budget_confirmed": budget,
        "escalated_case": escalated,
    })
    frame[_TARGET] = rng.random(n) < conversion_probability(frame)
    return frame


def _calibrate(rng: np.random.Generator, profile: _Profile) -> _Profile:
    """Shift the client's lead engagement until its leads convert at its target rate.

    Label skew comes from *who* the client's leads are (more or less engaged,
    budget confirmed more or less often), never from resampling labels: so
    P(y | x) is the same at every client and in the test set, and a model cannot
    learn a client's base rate from client-identifying traits (such as a column
    the client does not collect) that would not carry over to new data.
    """
    sample = 2000
    low, high = -4.0, 4.0
    for _ in range(30):
        mid = (low + high) / 2
        probe = replace(profile, engagement=profile.engagement + mid)
        rate = float(conversion_probability(_draw_leads(rng, probe, sample)).mean())
        if abs(rate - profile.target_rate) < 0.003:
            break
        low, high = (mid, high) if rate < profile.target_rate else (low, mid)
    return replace(profile, engagement=profile.engagement + mid)


def _draw_client_rows(rng: np.random.Generator, profile: _Profile, rows: int) -> pd.DataFrame:
    """``rows`` rows of a calibrated profile, labelled by the shared model (no label resampling)."""
    return _draw_leads(rng, profile, rows)


def _draw_test(rng: np.random.Generator, profiles: list[_Profile], rows: list[int], n: int) -> pd.DataFrame:
    """The held-out set: every client's population in proportion to its rows, natural labels."""
    weights = np.asarray(rows, dtype="float64") / float(sum(rows))
    counts = np.floor(weights * n).astype(int)
    counts[: n - int(counts.sum())] += 1
    parts = [_draw_leads(rng, p, int(c)) for p, c in zip(profiles, counts) if c > 0]
    test = pd.concat(parts, ignore_index=True)
    return test.iloc[rng.permutation(len(test))].reset_index(drop=True)


def _blank_mask(rng: np.random.Generator, n: int, columns: list[str], rate: float) -> pd.DataFrame:
    """Which feature cells are left empty: missing values, as in any real CRM export."""
    return pd.DataFrame({c: rng.random(n) < rate for c in columns})


# --------------------------------------------------------------------------- dialects

# Column-name styles. ``{rev}`` and ``{t}`` take the style's words for the revenue
# unit (usd / k) and the inactivity unit (days / weeks / hours).
_NAME_STYLES: list[tuple[dict[str, str], dict[str, str], dict[str, str]]] = [
    (  # snake_case export
        {"lead_source": "lead_source", "industry": "industry", "region": "region", "company_size": "employees",
         "annual_revenue": "annual_revenue_{rev}", "email_opens": "email_opens", "web_visits": "web_visits",
         "meetings_held": "meetings_held", "days_since_last_activity": "{t}_since_last_activity",
         "open_cases": "open_cases", "opportunity_amount": "opportunity_amount",
         "budget_confirmed": "budget_confirmed", "escalated_case": "escalated_case", "converted": "converted"},
        {"usd": "usd", "k": "kusd"},
        {"days": "days", "weeks": "weeks", "hours": "hours"},
    ),
    (  # Salesforce standard fields
        {"lead_source": "LeadSource", "industry": "Industry", "region": "Region__c",
         "company_size": "NumberOfEmployees", "annual_revenue": "AnnualRevenue{rev}",
         "email_opens": "EmailOpens__c", "web_visits": "WebVisits__c", "meetings_held": "MeetingsHeld__c",
         "days_since_last_activity": "{t}SinceLastActivity__c", "open_cases": "OpenCases__c",
         "opportunity_amount": "Amount", "budget_confirmed": "BudgetConfirmed__c",
         "escalated_case": "HasEscalatedCase__c", "converted": "IsWon"},
        {"usd": "", "k": "K__c"},
        {"days": "Days", "weeks": "Weeks", "hours": "Hours"},
    ),
    (  # custom fields everywhere
        {"lead_source": "Source__c", "industry": "Industry__c", "region": "Sales_Region__c",
         "company_size": "Employees__c", "annual_revenue": "Revenue_{rev}__c", "email_opens": "Email_Opens__c",
         "web_visits": "Site_Visits__c", "meetings_held": "Meetings__c", "days_since_last_activity": "Inactive_{t}__c",
         "open_cases": "Open_Cases__c", "opportunity_amount": "Opportunity_Amount__c",
         "budget_confirmed": "Budget_Confirmed__c", "escalated_case": "Escalated__c", "converted": "Converted__c"},
        {"usd": "USD", "k": "kUSD"},
        {"days": "Days", "weeks": "Weeks", "hours": "Hours"},
    ),
    (  # a report exported for people
        {"lead_source": "Lead Source", "industry": "Industry", "region": "Region", "company_size": "Company Size",
         "annual_revenue": "Annual Revenue ({rev})", "email_opens": "Email Opens (90d)", "web_visits": "Web Visits",
         "meetings_held": "Meetings Held", "days_since_last_activity": "{t} Since Last Activity",
         "open_cases": "Open Cases", "opportunity_amount": "Opportunity Amount",
         "budget_confirmed": "Budget Confirmed", "escalated_case": "Escalated Case", "converted": "Converted"},
        {"usd": "USD", "k": "k USD"},
        {"days": "Days", "weeks": "Weeks", "hours": "Hours"},
    ),
    (  # terse home-grown CRM
        {"lead_source": "source", "industry": "sector", "region": "territory", "company_size": "headcount",
         "annual_revenue": "revenue{rev}", "email_opens": "opens", "web_visits": "visits",
         "meetings_held": "meetings", "days_since_last_activity": "idle_{t}", "open_cases": "cases_open",
         "opportunity_amount": "deal_size", "budget_confirmed": "budget_ok", "escalated_case": "escalation",
         "converted": "won"},
        {"usd": "", "k": "_k"},
        {"days": "days", "weeks": "weeks", "hours": "hours"},
    ),
]

# Picklist spellings: canonical value -> local value, per style (style 0 is canonical).
_VALUE_STYLES: list[dict[str, dict[str, str]]] = [
    {},
    {
        "lead_source": {"web": "Web", "referral": "Referral", "partner": "Partner", "event": "Event",
                        "cold_call": "Cold Call", "advertisement": "Advertisement"},
        "industry": {i: i.capitalize() for i in _INDUSTRIES},
        "region": {"north_america": "North America", "emea": "EMEA", "apac": "APAC", "latam": "LATAM"},
    },
    {
        "lead_source": {s: s.upper() for s in _SOURCES},
        "industry": {"technology": "TECH", "finance": "FINANCE", "healthcare": "HEALTHCARE", "retail": "RETAIL",
                     "manufacturing": "MANUFACTURING", "education": "EDUCATION"},
        "region": {"north_america": "NORAM", "emea": "EMEA", "apac": "APAC", "latam": "LATAM"},
    },
    {
        "lead_source": {"web": "Website", "referral": "Employee Referral", "partner": "Partner",
                        "event": "Trade Show", "cold_call": "cold-call", "advertisement": "Advertisement"},
        "industry": {"technology": "Technology", "finance": "Financial Services", "healthcare": "Healthcare",
                     "retail": "Retail", "manufacturing": "Manufacturing", "education": "Education"},
        "region": {"north_america": "US & Canada", "emea": "Europe", "apac": "Asia Pacific",
                   "latam": "Latin America"},
    },
    {
        "lead_source": {"web": "web", "referral": "referral", "partner": "channel-partner", "event": "event",
                        "cold_call": "cold-call", "advertisement": "ads"},
        "industry": {"technology": "tech", "finance": "banking", "healthcare": "health", "retail": "retail",
                     "manufacturing": "industrial", "education": "edu"},
        "region": {"north_america": "amer", "emea": "emea", "apac": "apac", "latam": "latam"},
    },
]

_FLAG_STYLES = [("true", "false"), ("Yes", "No"), ("Y", "N"), ("TRUE", "FALSE"), ("1", "0")]
_TARGET_STYLES = [("true", "false"), ("Won", "Lost"), ("Closed Won", "Open"), ("1", "0"), ("Yes", "No"),
                  ("Converted", "Not Converted")]
_DAYS_UNITS = ["days", "weeks", "days", "hours"]
_DAYS_SCALE = {"days": 1.0, "weeks": 7.0, "hours": 1.0 / 24.0}
_EXTRA_COLUMNS = ["OwnerEmail", "Notes", "LeadId", "CreatedDate", "Rating"]

_COMPANIES = [
    "acme-corp", "globex", "initech", "umbrella-health", "stark-industries", "wayne-enterprises", "hooli",
    "vandelay-imports", "cyberdyne", "soylent", "tyrell-corp", "wonka-industries", "massive-dynamic",
    "aperture-science", "oscorp", "pied-piper", "dunder-mifflin", "monarch-solutions", "nakatomi-trading",
    "gringotts-finance", "blue-sun", "weyland-yutani", "virtucon", "prestige-worldwide", "bluth-company",
    "los-pollos-hermanos", "sterling-cooper", "gekko-partners", "oceanic-airlines", "rekall", "spacely-sprockets",
    "cogswell-cogs", "duff-brewing", "krusty-krab", "planet-express", "mom-corp",
]
_OWNERS = ["alex.kim", "maria.garcia", "sam.patel", "jordan.lee", "chris.novak", "dana.okafor", "lee.chen"]
_NOTES = ["", "", "Asked for pricing", "Follow up after Q3, maybe", 'Met at "SaaS Connect" booth',
          "Champion left the company", "Needs security review", "Wants a pilot; legal is slow"]


@dataclass(frozen=True)
class _Dialect:
    """How one client stores leads: names, spellings, booleans, units, gaps, noise."""

    columns: dict[str, str]              # canonical -> local column, for the columns the client has
    spellings: dict[str, dict[str, str]]  # categorical field -> canonical value -> local value
    flags: tuple[str, str]               # local true / false for boolean features
    target_flags: tuple[str, str]        # local true / false for the target
    revenue_in_thousands: bool
    days_unit: str
    extras: tuple[str, ...]


def _choose_dialect(index: int, offsets: np.ndarray, rng: np.random.Generator) -> _Dialect:
    """Rotate every choice with the client index (seed-dependent offsets) so clients differ."""
    names, rev_words, t_words = _NAME_STYLES[(index + int(offsets[0])) % len(_NAME_STYLES)]
    revenue_k = (index + int(offsets[4])) % 3 == 0
    days_unit = _DAYS_UNITS[(index + int(offsets[5])) % len(_DAYS_UNITS)]
    gaps = (index + int(offsets[6])) % 5
    dropped = {"web_visits"} if gaps == 1 else {"open_cases", "escalated_case"} if gaps == 3 else set()
    columns = {
        c: names[c].format(rev=rev_words["k" if revenue_k else "usd"], t=t_words[days_unit])
        for c in _FEATURES + [_TARGET]
        if c not in dropped
    }
    n_extra = 1 + int(rng.integers(2))
    extras = tuple(sorted(rng.choice(len(_EXTRA_COLUMNS), size=n_extra, replace=False).tolist()))
    return _Dialect(
        columns=columns,
        spellings=_VALUE_STYLES[(index + int(offsets[1])) % len(_VALUE_STYLES)],
        flags=_FLAG_STYLES[(index + int(offsets[2])) % len(_FLAG_STYLES)],
        target_flags=_TARGET_STYLES[(index + int(offsets[3])) % len(_TARGET_STYLES)],
        revenue_in_thousands=revenue_k,
        days_unit=days_unit,
        extras=tuple(_EXTRA_COLUMNS[e] for e in extras),
    )


def _format_int(values: pd.Series) -> pd.Series:
    return pd.Series([str(int(v)) for v in values], index=values.index, dtype=object)


def _format_fixed(values: np.ndarray, digits: int) -> list[str]:
    return [f"{v:.{digits}f}" for v in values]


def _extra_column(name: str, rng: np.random.Generator, n: int, company: str) -> list[str]:
    if name == "OwnerEmail":
        return [f"{_OWNERS[k]}@{company}.example" for k in rng.integers(len(_OWNERS), size=n)]
    if name == "Notes":
        return [_NOTES[k] for k in rng.integers(len(_NOTES), size=n)]
    if name == "LeadId":
        alphabet = np.array(list("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"))
        return ["00Q" + "".join(row) for row in alphabet[rng.integers(len(alphabet), size=(n, 12))]]
    if name == "CreatedDate":
        days = rng.integers(0, 365, size=n)
        return [str(np.datetime64("2024-01-01") + np.timedelta64(int(d), "D")) for d in days]
    return [("Hot", "Warm", "Cold")[k] for k in rng.integers(3, size=n)]


def _to_local(frame: pd.DataFrame, blank: pd.DataFrame, dialect: _Dialect, rng: np.random.Generator,
              company: str) -> pd.DataFrame:
    """The client's CSV table: canonical rows rewritten in its dialect, blanks applied."""
    cols: dict[str, pd.Series] = {}
    for name in _FEATURES:
        if name not in dialect.columns:
            continue
        values = frame[name]
        if name in _CATEGORICAL:
            table = dialect.spellings.get(name, {})
            text = values.map(lambda v: table.get(v, v)).astype(object)
        elif name in _BOOLEAN:
            text = values.map(lambda v: dialect.flags[0] if v else dialect.flags[1]).astype(object)
        elif name == "annual_revenue" and dialect.revenue_in_thousands:
            text = pd.Series(_format_fixed(values.to_numpy() / 1000.0, 1), index=values.index, dtype=object)
        elif name == "days_since_last_activity" and dialect.days_unit == "weeks":
            text = pd.Series(_format_fixed(values.to_numpy() / 7.0, 2), index=values.index, dtype=object)
        elif name == "days_since_last_activity" and dialect.days_unit == "hours":
            text = _format_int(values * 24)
        else:
            text = _format_int(values)
        cols[name] = text.where(~blank[name].to_numpy(), None)
    cols[_TARGET] = frame[_TARGET].map(
        lambda v: dialect.target_flags[0] if v else dialect.target_flags[1]).astype(object)

    order = list(cols)
    order = [order[k] for k in rng.permutation(len(order))]
    local = pd.DataFrame({dialect.columns[c]: cols[c] for c in order})
    for extra in dialect.extras:
        position = int(rng.integers(local.shape[1] + 1))
        local.insert(position, extra, _extra_column(extra, rng, len(local), company))
    return local


def _data_source(dialect: _Dialect, path: str) -> DataSource:
    """The manifest half of the dialect: how to read the client's table back into the canonical schema."""
    values: dict[str, dict[str, str | bool | int | float]] = {}
    for name, table in dialect.spellings.items():
        if name not in dialect.columns:
            continue
        renamed: dict[str, str | bool | int | float] = {local: canon for canon, local in table.items() if local != canon}
        if renamed:
            values[name] = renamed
    for name, (yes, no) in [(n, dialect.flags) for n in _BOOLEAN] + [(_TARGET, dialect.target_flags)]:
        if name in dialect.columns and (yes, no) != ("true", "false"):
            values[name] = {yes: True, no: False}
    transforms: dict[str, ValueTransform] = {}
    if dialect.revenue_in_thousands and "annual_revenue" in dialect.columns:
        transforms["annual_revenue"] = ValueTransform(scale=1000.0)
    if dialect.days_unit != "days" and "days_since_last_activity" in dialect.columns:
        transforms["days_since_last_activity"] = ValueTransform(scale=_DAYS_SCALE[dialect.days_unit])
    return DataSource(file=FileSource(path=path), mapping=dict(dialect.columns), values=values,
                      transforms=transforms)


# --------------------------------------------------------------------------- assembling a federation


@dataclass(frozen=True)
class _Client:
    namespace: str
    name: str
    profile: _Profile
    dialect: _Dialect
    frame: pd.DataFrame   # complete canonical rows, before blanking
    blank: pd.DataFrame   # True where the local cell is left empty
    local: pd.DataFrame   # the table written to the client's CSV


@dataclass(frozen=True)
class _Simulation:
    clients: list[_Client]
    test: pd.DataFrame        # complete canonical test rows, before blanking
    test_blank: pd.DataFrame  # True where test.csv has an empty cell


def _check_arguments(clients: int, rows: int, seed: int, alpha: float, test_rows: int | None, rounds: int,
                     min_rows: int | None = None) -> None:
    problems = []
    if min_rows is not None and not 20 <= min_rows <= rows:
        problems.append(f"min_rows must be from 20 to rows ({rows}) (got {min_rows}); tenant sizes spread between them")
    if clients < 1:
        problems.append(f"clients must be at least 1 (got {clients})")
    if rows < 20:
        problems.append(f"rows must be at least 20 per client (got {rows}); fewer cannot hold a label skew")
    if not alpha > 0 or not math.isfinite(alpha):
        problems.append(f"alpha must be a positive number (got {alpha}); smaller means more skewed clients")
    if seed < 0:
        problems.append(f"seed must be 0 or more (got {seed})")
    if test_rows is not None and test_rows < 1:
        problems.append(f"test_rows must be at least 1 (got {test_rows})")
    if not 1 <= rounds <= 10_000:
        problems.append(f"rounds must be between 1 and 10000 (got {rounds})")
    if problems:
        raise FedcrmError("cannot generate the synthetic federation: " + "; ".join(problems))


def _default_test_rows(clients: int, rows: int) -> int:
    return max(2000, min(20000, clients * rows // 5))


def _company(index: int, order: np.ndarray) -> str:
    name = _COMPANIES[int(order[index % len(_COMPANIES)])]
    return name if index < len(_COMPANIES) else f"{name}-{index + 1}"


def _tenant_sizes(seed_sequence: np.random.SeedSequence, clients: int, rows: int, min_rows: int | None) -> list[int]:
    """Rows per tenant: all ``rows``, or log-uniform from ``min_rows`` to ``rows`` (few large tenants, many small)."""
    if min_rows is None:
        return [rows] * clients
    rng = np.random.Generator(np.random.PCG64(seed_sequence))
    sizes = np.exp(rng.uniform(math.log(min_rows), math.log(rows), size=clients))
    return [int(v) for v in np.clip(np.round(sizes), min_rows, rows)]


def _simulate(*, clients: int, rows: int, seed: int = 0, alpha: float = 0.5,
              test_rows: int | None = None, min_rows: int | None = None) -> _Simulation:
    """Everything ``generate_federation`` writes, in memory, plus the pre-blank truth tests need."""
    _check_arguments(clients, rows, seed, alpha, test_rows, 1, min_rows)
    # Children are indexed: spawning one more (for the sizes) leaves every other stream, and so every file, as it was.
    children = np.random.SeedSequence(seed).spawn(clients + 3)
    sizes = _tenant_sizes(children[clients + 2], clients, rows, min_rows)
    n_test = _default_test_rows(len(sizes), sum(sizes) // len(sizes)) if test_rows is None else test_rows
    federation_rng = np.random.Generator(np.random.PCG64(children[0]))
    test_rng = np.random.Generator(np.random.PCG64(children[1]))
    offsets = federation_rng.integers(0, 60, size=7)
    order = federation_rng.permutation(len(_COMPANIES))

    client_rngs = []
    for child in children[2 : clients + 2]:
        data_seed, format_seed = child.spawn(2)
        client_rngs.append((np.random.Generator(np.random.PCG64(data_seed)),
                            np.random.Generator(np.random.PCG64(format_seed))))
    profiles = [_calibrate(data_rng, _draw_profile(data_rng, alpha)) for data_rng, _ in client_rngs]

    out: list[_Client] = []
    for i, ((data_rng, format_rng), profile, size) in enumerate(zip(client_rngs, profiles, sizes)):
        frame = _draw_client_rows(data_rng, profile, size)
        dialect = _choose_dialect(i, offsets, format_rng)
        blank = _blank_mask(format_rng, size, _FEATURES, float(format_rng.uniform(0.02, 0.04)))
        company = _company(i, order)
        out.append(_Client(
            namespace=f"tenant-{i + 1:02d}", name=company, profile=profile, dialect=dialect, frame=frame,
            blank=blank, local=_to_local(frame, blank, dialect, format_rng, company),
        ))

    test = _draw_test(test_rng, profiles, sizes, n_test)
    test_blank = _blank_mask(test_rng, len(test), _FEATURES, 0.03)
    return _Simulation(clients=out, test=test, test_blank=test_blank)


def _canonical_csv(frame: pd.DataFrame, blank: pd.DataFrame) -> pd.DataFrame:
    """The test set as written: canonical names and values, true/false, empty cells for missing."""
    cols: dict[str, pd.Series] = {}
    for name in _FEATURES:
        values = frame[name]
        if name in _CATEGORICAL:
            text = values.astype(object)
        elif name in _BOOLEAN:
            text = values.map(lambda v: "true" if v else "false").astype(object)
        else:
            text = _format_int(values)
        cols[name] = text.where(~blank[name].to_numpy(), None)
    cols[_TARGET] = frame[_TARGET].map(lambda v: "true" if v else "false").astype(object)
    return pd.DataFrame(cols)


@dataclass(frozen=True)
class SynthResult:
    """Where :func:`generate_federation` put things."""

    federation_path: Path
    participant_paths: list[Path]
    test_path: Path
    out_dir: Path


def canonical_task() -> Task:
    """The canonical lead-conversion task every generated federation uses."""
    return LEAD_CONVERSION_TASK


def _federation(namespaces: list[str], rounds: int, seed: int) -> Federation:
    clients = len(namespaces)
    return Federation(
        metadata=ObjectMeta(name=FEDERATION_NAME, namespace=FEDERATION_NAMESPACE),
        spec=FederationSpec(
            task=LEAD_CONVERSION_TASK,
            model=ModelSpec(hidden=[64, 32]),
            training=Training(
                rounds=rounds, local_epochs=1, batch_size=64, learning_rate=0.005,
                min_participants=min(clients, max(2, math.ceil(clients / 2))),
                round_timeout_seconds=120, seed=seed,
            ),
            privacy=Privacy(secure_aggregation=SecureAggregation(enabled=True)),
            participants=ParticipantsSpec(namespaces=namespaces),
        ),
    )


def _readme(clients: int, rows: int, seed: int, alpha: float) -> str:
    return "\n".join([
        "# Synthetic lead-conversion federation",
        "",
        f"Generated by fedcrm.data.synthetic: {clients} enterprise(s) x {rows} leads, seed {seed}, alpha {alpha:g}.",
        "- `federation.yaml`: the Federation (canonical task, model, training settings).",
        "- `participants/<namespace>.yaml`: one Participant per enterprise, mapping its own CRM dialect.",
        "- `data/<namespace>/leads.csv`: each enterprise's leads in its local columns, spellings and units.",
        "- `test.csv`: held-out leads in the canonical schema, for evaluation only.",
        "",
        "Run it: `fedcrm run --federation federation.yaml --participant participants/*.yaml "
        "--test-data test.csv --out runs/<name>`",
        "",
    ])


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="\n")


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, lineterminator="\n", encoding="utf-8")


def generate_federation(out_dir: Path, *, clients: int, rows: int, seed: int = 0, alpha: float = 0.5,
                        test_rows: int | None = None, rounds: int = 20, min_rows: int | None = None) -> SynthResult:
    """Write a ready-to-run federation of ``clients`` enterprises to ``out_dir``.

    Each client gets ``rows`` leads in its own dialect plus a Participant
    manifest that maps them back; ``test.csv`` holds canonical held-out rows
    (default ``max(2000, min(20000, clients * mean rows // 5))``). With
    ``min_rows``, tenant sizes spread log-uniformly from ``min_rows`` to
    ``rows``: the small, skewed tenants real CRM federations have. Same
    arguments, same bytes. Raises :class:`FedcrmError` for arguments that
    cannot work.
    """
    _check_arguments(clients, rows, seed, alpha, test_rows, rounds, min_rows)
    out_dir = Path(out_dir)
    sim = _simulate(clients=clients, rows=rows, seed=seed, alpha=alpha, test_rows=test_rows, min_rows=min_rows)

    federation_path = out_dir / "federation.yaml"
    _write_text(federation_path, dump_manifest(_federation([c.namespace for c in sim.clients], rounds, seed)))

    participant_paths: list[Path] = []
    for client in sim.clients:
        data_path = out_dir / "data" / client.namespace / "leads.csv"
        manifest_path = out_dir / "participants" / f"{client.namespace}.yaml"
        _write_csv(data_path, client.local)
        participant = Participant(
            metadata=ObjectMeta(name=client.name, namespace=client.namespace),
            spec=ParticipantSpec(
                federation_ref=FederationRef(name=FEDERATION_NAME, namespace=FEDERATION_NAMESPACE),
                data=_data_source(client.dialect, f"../data/{client.namespace}/leads.csv"),
            ),
        )
        _write_text(manifest_path, dump_manifest(participant))
        participant_paths.append(manifest_path)

    test_path = out_dir / "test.csv"
    _write_csv(test_path, _canonical_csv(sim.test, sim.test_blank))
    _write_text(out_dir / "README.md", _readme(clients, rows, seed, alpha))
    return SynthResult(federation_path=federation_path, participant_paths=participant_paths,
                       test_path=test_path, out_dir=out_dir)
