"""The analyst's market data: a small fixed data set standing in for a market-data API.

Fixed data keeps the example offline and its answers reproducible; the tools in ``tasks.py`` are
written the way they would be against a real API (a lookup by company that can fail with a hint).
"""

from __future__ import annotations

import re
from typing import TypedDict


class Figures(TypedDict):
    company: str
    sector: str
    revenue_musd: float
    revenue_growth_pct: float
    operating_margin_pct: float
    net_cash_musd: float


class Headline(TypedDict):
    date: str
    headline: str
    sentiment: str


FIGURES: dict[str, Figures] = {
    "Acme Robotics": {
        "company": "Acme Robotics",
        "sector": "Industrial automation",
        "revenue_musd": 412.0,
        "revenue_growth_pct": 18.4,
        "operating_margin_pct": 12.1,
        "net_cash_musd": 85.0,
    },
    "Globex Energy": {
        "company": "Globex Energy",
        "sector": "Utilities",
        "revenue_musd": 2310.0,
        "revenue_growth_pct": 3.2,
        "operating_margin_pct": 9.4,
        "net_cash_musd": -640.0,
    },
    "Initech Software": {
        "company": "Initech Software",
        "sector": "Enterprise software",
        "revenue_musd": 158.0,
        "revenue_growth_pct": -4.5,
        "operating_margin_pct": 2.3,
        "net_cash_musd": 22.0,
    },
    "Umbra Biotech": {
        "company": "Umbra Biotech",
        "sector": "Biotechnology",
        "revenue_musd": 61.0,
        "revenue_growth_pct": 41.0,
        "operating_margin_pct": -18.0,
        "net_cash_musd": 310.0,
    },
}

NEWS: dict[str, list[Headline]] = {
    "Acme Robotics": [
        {
            "date": "2026-03-02",
            "headline": "Acme wins a multi-year warehouse contract in Rotterdam",
            "sentiment": "positive",
        },
        {
            "date": "2026-02-11",
            "headline": "Supplier delays push two Acme product launches to Q3",
            "sentiment": "negative",
        },
    ],
    "Globex Energy": [
        {"date": "2026-03-05", "headline": "Regulator approves Globex's grid upgrade tariff", "sentiment": "positive"},
        {"date": "2026-01-20", "headline": "Globex refinances 2027 bonds at a higher coupon", "sentiment": "negative"},
    ],
    "Initech Software": [
        {
            "date": "2026-02-27",
            "headline": "Initech loses its largest customer to a cloud rival",
            "sentiment": "negative",
        },
        {"date": "2026-02-03", "headline": "Initech announces a cost programme and a new CEO", "sentiment": "neutral"},
    ],
    "Umbra Biotech": [
        {"date": "2026-03-09", "headline": "Umbra's lead therapy meets its phase II endpoint", "sentiment": "positive"},
        {
            "date": "2026-02-15",
            "headline": "Umbra raises $200M in an oversubscribed placement",
            "sentiment": "positive",
        },
    ],
}

COMPANIES: tuple[str, ...] = tuple(FIGURES)


def find_company(name: str) -> str | None:
    """The data set's spelling of ``name`` (case and surrounding space ignored), or None."""
    wanted = name.strip().casefold()
    for company in COMPANIES:
        if company.casefold() == wanted or company.split()[0].casefold() == wanted:
            return company
    return None


def mentioned_company(text: str) -> str | None:
    """The first company of the data set that ``text`` names, by full name or first word."""
    lowered = text.casefold()
    for company in COMPANIES:
        if company.casefold() in lowered or re.search(rf"\b{re.escape(company.split()[0].casefold())}\b", lowered):
            return company
    return None
