"""A Lambda-style handler: one Monte Carlo estimate of a European call option's price per event.

Each event names a random seed and a number of paths; the handler simulates that many end prices
of the underlying under geometric Brownian motion and returns the sums a caller needs to combine
any number of events into one price and its standard error. Standard library only, so it runs in
any image with python3 (examples/functions/map_montecarlo.py builds one offline).
"""

from __future__ import annotations

import math
import random
from typing import Any


def lambda_handler(event: dict[str, Any], context: Any) -> dict[str, float | int]:
    """``event``: ``seed``, ``paths`` and the option (``spot``, ``strike``, ``rate``, ``vol``,
    ``years``); returns the discounted payoffs' sum and sum of squares over the paths."""
    rng = random.Random(event["seed"])
    spot, strike, rate = float(event["spot"]), float(event["strike"]), float(event["rate"])
    vol, years, paths = float(event["vol"]), float(event["years"]), int(event["paths"])
    drift = (rate - 0.5 * vol * vol) * years
    spread = vol * math.sqrt(years)
    discount = math.exp(-rate * years)
    total = total_sq = 0.0
    for _ in range(paths):
        price = spot * math.exp(drift + spread * rng.gauss(0.0, 1.0))
        payoff = discount * max(price - strike, 0.0)
        total += payoff
        total_sq += payoff * payoff
    return {"paths": paths, "sum": total, "sum_sq": total_sq}


def black_scholes_call(spot: float, strike: float, rate: float, vol: float, years: float) -> float:
    """The closed-form price the Monte Carlo estimate converges to."""
    d1 = (math.log(spot / strike) + (rate + 0.5 * vol * vol) * years) / (vol * math.sqrt(years))
    d2 = d1 - vol * math.sqrt(years)

    def cdf(x: float) -> float:
        return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))

    return spot * cdf(d1) - strike * math.exp(-rate * years) * cdf(d2)
