"""A study as one self-contained HTML page with PNG figures, for people who would rather look.

It answers how good the plan is (full-precision, search, test and fine-tuned accuracy, and the uniform
plans at each bit-width for reference), how it uses the budget, and why each layer got its bits.
Figures: trial score against the budget's first metric for every trial (front, seeds, uniform plans
and the budget marked), the chosen plan's bits per layer against sensitivity and cost share, and
the search history.
"""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402

from .budget import format_quantity  # noqa: E402
from .evaluate import format_score, score_label  # noqa: E402
from .engine import OUTCOME, REPORT_FACTS  # noqa: E402
from .errors import UserError  # noqa: E402
from .plan import Plan  # noqa: E402
from .objective import FINALIST_SCORES, best_trial, feasible_trials, finalist_score, pareto_trials  # noqa: E402

KIB = 1024


def write_report(study: optuna.Study, folder: str | Path) -> Path:
    """index.html plus pareto.png, layers.png and history.png in `folder`, from the study alone."""
    facts = study.user_attrs.get(REPORT_FACTS)
    if facts is None:
        raise UserError(f"study {study.study_name} was made before studies kept what the report shows: run "
                        f"`oaq-search run` on its study file once (it resumes, every trial kept), then report")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    best = best_trial(study)
    plan = Plan.from_dict(best.user_attrs["plan"])
    shares = weight_shares(plan, best.user_attrs["costs"])
    score, outcome = facts["score"], study.user_attrs.get(OUTCOME, {})
    metric = next(iter(facts["budget"]), next(iter(best.user_attrs["costs"])))  # no budget: the first cost
    limit = facts["budget"].get(metric)
    _pareto_figure(study, best, score, metric, limit, outcome.get("uniform", []), folder / "pareto.png")
    _layers_figure(facts, plan, shares, folder / "layers.png")
    _history_figure(study, score, folder / "history.png")
    budget_rows = "".join(
        f"<tr><td>{html.escape(metric)}</td><td>{format_quantity(metric, best.user_attrs['costs'][metric])}</td>"
        f"<td>{format_quantity(metric, limit)}</td><td>{100 * best.user_attrs['costs'][metric] / limit:.1f} %</td></tr>"
        for metric, limit in facts["budget"].items())
    rescored, finalist_scores = finalist_score(study, best), study.user_attrs.get(FINALIST_SCORES, {})
    margin = f"{facts['seed_margin']:g} standard errors of their paired per-image difference"
    finalist = "" if rescored is None else f" and {format_score(score, rescored)} on the whole search split " + (
        "(the best finalist)" if rescored >= max(finalist_scores.values()) else
        f"(the integer-program seed, kept: no better finalist beat it by {margin})"
        if best.user_attrs.get("seed") == "integer_program" else
        f"(the best finalist that beat the integer-program seed by {margin})")
    reasons = "".join(f"<li>{html.escape(sentence)}</li>" for sentence in layer_reasons(facts, plan, shares))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>oaq-search: {html.escape(study.study_name)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}img{{max-width:100%}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.2em .6em}}</style></head><body>
<h1>Study {html.escape(study.study_name)}</h1>
<p>Model {html.escape(facts['model'])}; {len(study.trials)} trials; best trial #{best.number}
({html.escape(str(best.user_attrs.get('seed') or 'sampled'))}) with {format_score(score, best.values[0])} on the images scored per
trial{finalist}.</p>
<h2>How good is it</h2>{_accuracy_table(outcome, score, best.number)}
<h2>Budget use</h2><table><tr><th>metric</th><th>used</th><th>limit</th><th>share</th></tr>{budget_rows}</table>
<h2>Score against {html.escape(metric)}</h2><img src="pareto.png" alt="score vs {html.escape(metric)}">
{_uniform_table(outcome.get("uniform", []), score, metric, limit)}
<h2>The chosen plan, layer by layer</h2><img src="layers.png" alt="bits per layer">
<ul>{reasons}</ul>
<h2>Search history</h2><img src="history.png" alt="search history">
</body></html>
"""
    path = folder / "index.html"
    path.write_text(page)
    return path


def _accuracy_table(outcome: dict, score: str, best: int) -> str:
    """Full precision, the chosen plan post-training and fine-tuned: search score and test accuracy."""
    if outcome.get("test_accuracy") is None:
        return "<p>The chosen plan has not been scored on test: `oaq-search run` scores it when the trials end.</p>"
    fp = outcome["fp_test_accuracy"]
    stale = "" if outcome["trial"] == best else (f"<p>Scored for trial #{outcome['trial']}, the best when the last run "
                                                 f"ended; run the study again to score trial #{best}.</p>")
    search = format_score(score, outcome["search_score"]) + (
        "" if outcome["finalist_score"] is None else f" ({format_score(score, outcome['finalist_score'])} whole split)")
    chosen = f"chosen plan (trial #{outcome['trial']}), post-training"
    if outcome.get("nearest_test_accuracy") is None:
        rows = [("full precision", "", fp), (chosen, search, outcome["test_accuracy"])]
    else:
        rows = [("full precision", "", fp), (f"{chosen}, rounded to nearest", search, outcome["nearest_test_accuracy"]),
                (f"{chosen}, reconstructed", "", outcome["test_accuracy"])]
    if "finetuned" in outcome:
        tuned = outcome["finetuned"]
        rows.append((f"fine-tuned ({tuned['mode']}, {tuned['epochs']} epoch{'s' * (tuned['epochs'] != 1)})", "",
                     tuned["test_accuracy"]))
    cells = "".join(f"<tr><td>{html.escape(name)}</td><td>{html.escape(search)}</td><td>{test:.2f} %</td>"
                    f"<td>{test - fp:+.2f}</td></tr>" for name, search, test in rows)
    return (f"{stale}<table><tr><th>model</th><th>search split</th><th>test ({outcome['test_images']} images)</th>"
            f"<th>change vs full precision</th></tr>{cells}</table>")


def _uniform_table(baselines: list[dict], score: str, metric: str, limit: float | None) -> str:
    """The uniform plans at each searched bit-width: their cost, score, and whether they fit."""
    if not baselines:
        return ""
    cells = "".join(f"<tr><td>W{b['weight_bits']}</td><td>{format_quantity(metric, b['costs'][metric])}</td>"
                    f"<td>{'no budget' if limit is None else 'yes' if b['costs'][metric] <= limit else 'no'}</td><td>{format_score(score, b['score'])}"
                    f"</td></tr>" for b in baselines)
    return (f"<p>Uniform plans for reference (every searched layer at one bit-width, scored as the trials are):</p>"
            f"<table><tr><th>uniform</th><th>{html.escape(metric)}</th><th>fits the budget</th><th>search split</th>"
            f"</tr>{cells}</table>")


def weight_shares(plan: Plan, totals: dict[str, float]) -> dict[str, float] | None:
    """Each layer's share of the plan's weight bytes, from the costs the plan carries; None where they are
    not there (a cost model without weight bytes, or a trial stored before plans carried layer costs)."""
    if "weight_bytes" not in totals or any("weight_bytes" not in layer.cost for layer in plan.layers):
        return None
    return {layer.name: layer.cost["weight_bytes"] / totals["weight_bytes"] for layer in plan.layers}


def layer_reasons(facts: dict, plan: Plan, shares: dict[str, float] | None) -> list[str]:
    """One sentence per layer, following from the numbers it states: its bits against the searched
    layers' median, its sensitivity rank, and its share of the weight bytes."""
    searched = [layer for layer in plan.layers if layer.name not in facts["pinned"]]
    ranking = sorted((layer.name for layer in searched), key=lambda name: -facts["sensitivity"][name])
    median = sorted(layer.weight_bits for layer in searched)[len(searched) // 2] if searched else 0
    sentences = []
    for layer in plan.layers:
        share = "" if shares is None else f" {100 * shares[layer.name]:.1f} % of the weight bytes;"
        if layer.name in facts["pinned"]:
            sentences.append(f"{layer.name}: {layer.summary()};{share} pinned (first or last layer).")
            continue
        rank = ranking.index(layer.name) + 1
        level = "most" if rank <= len(ranking) / 3 else "least" if rank > 2 * len(ranking) / 3 else "middle"
        sensitive = f"rank {rank} of {len(ranking)} by {facts['sensitivity_label']}"
        large = shares is not None and shares[layer.name] > 1.5 / len(plan.layers)  # 1.5x the mean share
        above, below = layer.weight_bits > median, layer.weight_bits < median
        more = "more" if above else "fewer"
        if not above and not below:
            why = f"the median bits; {sensitive}"
        elif (above and level == "most") or (below and level == "least"):
            why = f"{more} bits than the median: among the {level} sensitive ({sensitive})"
        elif below and large:
            why = f"fewer bits than the median though not among the least sensitive ({sensitive}): it is one of "
            why += "the largest layers, so its bits cost the most"
        elif above and shares is not None and not large:
            why = f"more bits than the median though not among the most sensitive ({sensitive}): it is small, "
            why += "so its bits are cheap"
        else:
            why = f"{more} bits than the median, which its sensitivity ({sensitive}) alone does not explain: "
            why += "the measured damage or the trials' scores chose it"
        sentences.append(f"{layer.name}: {layer.summary()};{share} {why}.")
    return sentences


def _pareto_figure(study: optuna.Study, best, score: str, metric: str, limit: float | None, baselines: list[dict],
                   path: Path) -> None:
    """Every feasible trial's score against the budget's first metric, the uniform plans beside them."""
    scale, unit = _axis_unit(metric)
    trials = [t for t in feasible_trials(study) if metric in t.user_attrs["costs"]]
    front = {t.number for t in pareto_trials(study)}
    figure, axis = plt.subplots(figsize=(8.5, 4.2))
    cost = lambda t: t.user_attrs["costs"][metric] / scale  # noqa: E731
    axis.scatter([cost(t) for t in trials], [t.values[0] for t in trials], s=14, c="#bbb", label="trials")
    on_front = sorted((t for t in trials if t.number in front), key=cost)
    axis.plot([cost(t) for t in on_front], [t.values[0] for t in on_front], "o-", c="#1f77b4", label="Pareto front")
    for t in trials:
        if t.user_attrs.get("seed"):
            axis.scatter(cost(t), t.values[0], marker="s" if t.user_attrs["seed"] == "uniform" else "^", s=60,
                         label=f"seed: {t.user_attrs['seed']}", zorder=3)
    if baselines:
        points = [(b["costs"][metric] / scale, b["score"], f"W{b['weight_bits']}") for b in baselines]
        axis.plot([x for x, _, _ in points], [y for _, y, _ in points], "D:", c="#7f7f7f", ms=5, label="uniform plans")
        for x, y, name in points:
            axis.annotate(name, (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
    if limit is not None:
        axis.axvline(limit / scale, ls="--", c="#d62728", lw=1, label="budget")
    # hollow, so a seed the search kept stays visible inside it
    if metric in best.user_attrs["costs"]:
        axis.scatter(cost(best), best.values[0], marker="*", s=320, facecolors="none", edgecolors="#d62728",
                     linewidths=1.5, label="chosen", zorder=4)
    axis.set_xlabel(f"{metric} ({unit})" if unit else metric)
    axis.set_ylabel(score_label(score))
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    _save(figure, path)


def _axis_unit(metric: str) -> tuple[float, str]:
    """How a metric reads on an axis: bytes in KiB, seconds in ms, others as they are."""
    if metric.endswith("_bytes"):
        return KIB, "KiB"
    if metric.endswith("_s"):
        return 1e-3, "ms"
    return 1.0, ""


def _layers_figure(facts: dict, plan: Plan, shares: dict[str, float] | None, path: Path) -> None:
    names = [layer.name for layer in plan.layers]
    figure, axis = plt.subplots(figsize=(max(7, 0.32 * len(names)), 4.2))
    axis.bar(range(len(names)), [layer.weight_bits for layer in plan.layers], color="#9ecae1", label="weight bits")
    axis.set_ylabel("weight bits")
    axis.set_xticks(range(len(names)), names, rotation=90, fontsize=8)
    other = axis.twinx()
    other.plot(range(len(names)), [facts["sensitivity"][n] for n in names], "o-", c="#d62728", ms=3,
               label=facts["sensitivity_label"])
    if shares is not None:
        other.plot(range(len(names)), [shares[n] for n in names], "s--", c="#2ca02c", ms=3,
                   label="share of weight bytes")
    other.set_ylabel("sensitivity / cost share")
    figure.legend(fontsize=8, loc="lower center", ncol=3, bbox_to_anchor=(0.5, 0.0))
    figure.subplots_adjust(bottom=0.3)
    _save(figure, path)


def _history_figure(study: optuna.Study, score: str, path: Path) -> None:
    finished = sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE), key=lambda t: t.number)
    running, best = [], float("-inf")
    for t in finished:
        best = max(best, t.values[0])
        running.append(best)
    figure, axis = plt.subplots(figsize=(7, 3.2))
    axis.scatter([t.number for t in finished], [t.values[0] for t in finished], s=10, c="#999", label="trial")
    axis.plot([t.number for t in finished], running, c="#1f77b4", label="best so far")
    axis.set_xlabel("trial")
    axis.set_ylabel(score_label(score))
    axis.legend(fontsize=8)
    _save(figure, path)


def _save(figure, path: Path) -> None:
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
