"""Each site's differential-privacy budget over a run, from what the sites report (``metrics.json``).

A site trained under ``dp`` reports with its training scalars what Opacus did in the round at the site:
``dp_steps`` (private optimizer steps), ``dp_sample_rate`` (the Poisson rate its loader drew cases at:
batch size over its training cases) and, under ``local``, ``dp_noise_multiplier`` (per case: Opacus's sigma
over ``patches_per_volume``). The site's Opacus accountant lives for one round only (Fed-BioMed builds the
plan afresh each round), so the coordinator composes the rounds: after every round, each site's epsilon at
the spec's delta over all the rounds it reported (`pipelines.privacy.epsilon_spent`, Opacus's RDP
accountant). A round a site missed (failed before its report, not sampled) adds nothing; the epsilon only
grows.
"""

from __future__ import annotations

from typing import Any

from pipelines.privacy import epsilon_spent, site_dp_history

__all__ = ["privacy_line", "privacy_settings", "privacy_summary", "record_privacy", "site_epsilons"]


def privacy_settings(dp: dict[str, Any] | None) -> dict[str, Any] | None:
    """What ``metrics.json`` keeps of the spec's ``dp`` (``metrics["privacy"]``).

    Args:
        dp: the resolved spec's ``dp`` (None: off).

    Returns:
        ``type``, ``sigma``, ``clip``, ``delta`` and the privacy unit, or None.
    """
    if dp is None:
        return None
    return {"type": dp["type"], "sigma": float(dp["sigma"]), "clip": float(dp["clip"]), "delta": float(dp["delta"]), "unit": "case"}


def record_privacy(metrics: dict[str, Any], record: dict[str, Any]) -> dict[str, float | None]:
    """Put each site's budget so far into its row of ``record`` (``privacy``), composed over the run's rounds up to it.

    Args:
        metrics: the run's metrics (``privacy`` set, ``rounds`` holding the earlier records; ``record`` may be among them).
        record: the round's record (its site rows are updated in place).

    Returns:
        site name -> epsilon (None: central DP) of the sites that reported DP steps this round; empty without ``dp``.
    """
    settings = metrics.get("privacy")
    if not isinstance(settings, dict):
        return {}
    delta = float(settings["delta"])
    earlier = [r for r in metrics.get("rounds", []) if r is not record and r.get("round", 0) < record.get("round", 0)]
    incomplete = any(r.get("metrics_lost") for r in earlier)
    out: dict[str, float | None] = {}
    for nid, row in (record.get("sites") or {}).items():
        train = row.get("train") or {}
        if "dp_steps" not in train:
            continue
        name = row.get("name", nid)
        trains = [site.get("train") or {} for r in earlier for key, site in (r.get("sites") or {}).items() if site.get("name", key) == name]
        reported = [t for t in [*trains, train] if "dp_steps" in t]
        epsilon = epsilon_spent(site_dp_history(reported), delta) if settings.get("type") == "local" else None
        row["privacy"] = {
            "epsilon": epsilon,
            "delta": delta,
            "steps": int(sum(float(t["dp_steps"]) for t in reported)),
            "rounds": len(reported),
            "incomplete": incomplete,
        }
        out[name] = epsilon
    return out


def privacy_line(r: int, rounds: int, spent: dict[str, float | None], settings: dict[str, Any]) -> str:
    """The engine's log line of a round's privacy budgets.

    Args:
        r: the round, from 1.
        rounds: the run's rounds.
        spent: site name -> epsilon (`record_privacy`).
        settings: ``metrics["privacy"]``.

    Returns:
        One line.
    """
    if settings.get("type") != "local":
        return (
            f"round {r}/{rounds}: central dp: noise sigma*clip = {settings['sigma'] * settings['clip']:g} added to each site's parameters (no epsilon stated)"
        )
    sites = ", ".join(f"{name} {eps:.3g}" for name, eps in sorted(spent.items()) if eps is not None)
    return f"round {r}/{rounds}: privacy spent (epsilon at delta {settings['delta']:g}, composed over the rounds so far): {sites}"


def site_epsilons(metrics: dict[str, Any]) -> dict[str, list[tuple[int, float | None]]]:
    """Each site's epsilon after each round it trained in (``metrics.json``).

    Args:
        metrics: the run's metrics.

    Returns:
        site name -> [(round, epsilon)], in round order; empty for a run without ``dp``.
    """
    out: dict[str, list[tuple[int, float | None]]] = {}
    for record in metrics.get("rounds") or []:
        for nid, row in (record.get("sites") or {}).items():
            privacy = row.get("privacy")
            if isinstance(privacy, dict):
                out.setdefault(row.get("name", nid), []).append((int(record["round"]), privacy.get("epsilon")))
    return out


def privacy_summary(metrics: dict[str, Any]) -> str | None:
    """One line on the run's differential privacy: how it trained and each site's epsilon at delta after its last round.

    Args:
        metrics: the run's metrics.

    Returns:
        The line, or None for a run without ``dp``.
    """
    settings = metrics.get("privacy")
    if not isinstance(settings, dict):
        return None
    head = f"differential privacy: {settings.get('type')} (sigma {settings.get('sigma'):g}, clip {settings.get('clip'):g}; the privacy unit is a case)"
    if settings.get("type") != "local":
        return f"{head}: noise once per round on each site's parameters; no epsilon can be stated"
    spent = {name: rows[-1] for name, rows in site_epsilons(metrics).items() if rows}
    if not spent:
        return f"{head}: no site reported private steps yet"
    sites = ", ".join(f"{name} {eps:.3g} (after round {r})" for name, (r, eps) in sorted(spent.items()) if eps is not None)
    lost = any(r.get("metrics_lost") for r in metrics.get("rounds") or [])
    return f"{head}: epsilon at delta {settings.get('delta'):g}, composed over the rounds: {sites}" + (
        " (a round's metrics were lost: its steps are not counted)" if lost else ""
    )
