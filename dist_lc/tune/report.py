"""``DIR/report.md``, ``report.json``, ``best.yaml`` and ``plots/`` of a tune folder, built from the
folder alone (tune.json, the study's journal, the trials' CV folders): ``dist-lc tune --report DIR``.

What it says: every trial (parameters, KL mean ± std over the folds it finished, state, wall time),
the best trial's config as a recipe, how far the best trial is from the second best relative to its
fold noise (the standard error std/√folds) and fold by fold (paired), the parameters' importances
(PED-ANOVA, which needs no extra package) and the optimisation history.
"""
from __future__ import annotations

import math
import statistics
import warnings
from pathlib import Path

import yaml
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from optuna.trial import TrialState

from lc_common.atomic import write_bytes_atomic, write_json_atomic
from lc_common.errors import InputError, one_line

from ..plots import save_figure
from . import progress
from .settings import BEST, REPORT_JSON, REPORT_MD, Settings, existing_plan, load_settings
from .study import load_study

# PED-ANOVA compares the trials of a top quantile with all: Optuna's documentation asks for at least
# 5 trials in it, and a "top" of half the trials or more says little
IMPORTANCE_TOP_TRIALS = 5
IMPORTANCE_MIN_TRIALS = 2 * IMPORTANCE_TOP_TRIALS
PLOTS = {"history": "plots/history.png", "intermediate": "plots/intermediate.png"}


# ----------------------------------------------------------------------------- the trials' rows

def trial_row(settings: Settings, trial) -> dict:
    """One trial: its parameters, state, fold results (from its CV folder) and wall time."""
    plan = None
    try:
        plan = existing_plan(settings, trial.number)
        folds = progress.read_trial(plan) if plan is not None else []
    except InputError as exc:   # one trial's damaged folder or result: the others are still reported
        folds, unreadable = [], str(exc)
    else:
        unreadable = None
    results = progress.fold_results(folds)
    mean, std = progress.mean_std(results)
    wall = (trial.datetime_complete - trial.datetime_start).total_seconds() \
        if trial.datetime_complete and trial.datetime_start else None
    return {"number": trial.number, "state": trial.state.name, "params": dict(trial.params),
            "value": trial.value, "kl_mean": mean, "kl_std": std,
            "folds": [{"fold": f.fold, "best_val_kl": f.best, "best_epoch": (f.done or {}).get("best_epoch")}
                      for f in folds if f.best is not None],
            "folds_done": len(results), "folds_total": len(settings.folds), "wall_s": wall,
            "intermediate": {str(k): v for k, v in sorted(trial.intermediate_values.items())},
            "folder": f"trials/{trial.number}" if plan is not None else None, "unreadable": unreadable}


def ranked(rows: list[dict]) -> list[dict]:
    """The complete trials, best (lowest mean KL) first."""
    return sorted((r for r in rows if r["state"] == "COMPLETE" and r["kl_mean"] is not None),
                  key=lambda r: (r["kl_mean"], r["number"]))


def standard_error(row: dict) -> float | None:
    """The fold noise of a trial's mean: std over folds / √folds (None with fewer than 2 folds)."""
    return row["kl_std"] / math.sqrt(row["folds_done"]) if row["kl_std"] is not None else None


def gap(best: dict | None, second: dict | None) -> dict:
    """How far the best trial is from the second best: in units of the best's fold noise, and fold
    by fold. Both trials ran on the same folds, so how hard each fold is moves both alike; the
    per-fold differences (paired) leave that out, where two trials' standard errors would count it
    twice and call almost any two trials alike."""
    if best is None or second is None:
        return {"reason": "needs two completed trials"}
    diff = second["kl_mean"] - best["kl_mean"]
    se_best = standard_error(best)
    theirs = {f["fold"]: f["best_val_kl"] for f in second["folds"]}
    paired = [theirs[f["fold"]] - f["best_val_kl"] for f in best["folds"] if f["fold"] in theirs]
    se_paired = statistics.stdev(paired) / math.sqrt(len(paired)) if len(paired) >= 2 else None
    out = {"best": best["number"], "second": second["number"], "difference": diff, "se_best": se_best,
           "in_se_best": diff / se_best if se_best else None, "folds_paired": len(paired),
           "better_on": sum(d > 0 for d in paired), "se_paired": se_paired,
           "z": statistics.fmean(paired) / se_paired if se_paired else None}
    if se_best is None:
        out["reason"] = "one fold per trial: no fold noise to compare with"
    elif se_best == 0:
        out["reason"] = "its folds scored the same: no fold noise to compare with"
    return out


def importances(study, complete: int) -> dict:
    """{"values": {key: importance} (PED-ANOVA; sums to 1), "top": the quantile judged}, or
    {"reason": why not}. The top quantile holds at least 5 trials (Optuna's default, 10 %, once 50
    trials completed)."""
    if complete < IMPORTANCE_MIN_TRIALS:
        return {"reason": f"needs at least {IMPORTANCE_MIN_TRIALS} completed trials ({complete} so far)"}
    import optuna

    top = max(0.1, IMPORTANCE_TOP_TRIALS / complete)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = optuna.importance.get_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator(target_quantile=top))
    except (ValueError, RuntimeError, ZeroDivisionError) as exc:
        return {"reason": f"not computable: {one_line(exc)}"}
    return {"values": {k: float(v) for k, v in values.items()}, "top": top}


# ----------------------------------------------------------------------------- building it

def build(out) -> dict:
    """Write report.json, report.md, best.yaml (when a trial completed) and the plots; return the report."""
    out = Path(out)
    settings = load_settings(out)
    study = load_study(out)
    trials = study.get_trials(deepcopy=False)
    rows = [trial_row(settings, t) for t in trials]
    order = ranked(rows)
    best = order[0] if order else None
    states = {s.name: sum(r["state"] == s.name for r in rows) for s in TrialState}
    report = {"folder": str(out), "settings": _settings_summary(settings), "trials": rows,
              "states": {k: v for k, v in states.items() if v}, "best": best,
              "gap": gap(best, order[1] if len(order) > 1 else None),
              "importance": importances(study, len(order)), "plots": [], "best_recipe": None}
    report["plots"] = draw(out, rows, best)
    if best is not None:
        write_best(out, settings, best)
        report["best_recipe"] = BEST
    write_json_atomic(out / REPORT_JSON, report)
    write_bytes_atomic(out / REPORT_MD, markdown(report, settings).encode())
    return report


def _settings_summary(settings: Settings) -> dict:
    keys = ("recipe", "space_file", "folds", "fold_order", "executor", "sampler", "seed", "pruner",
            "pruner_startup", "pruner_warmup", "trials", "parallel", "steps_per_fold", "created")
    return {"space": settings.space, **{k: getattr(settings, k) for k in keys}}


def write_best(out: Path, settings: Settings, best: dict) -> None:
    """The best trial's resolved config as a recipe (`dist-lc cv --config DIR/best.yaml`)."""
    plan = existing_plan(settings, best["number"])
    config = plan.points[0].config
    # `dist-lc cv --config best.yaml` runs the winner on the recipe's folds, not only on the searched ones
    config = {**config, "cv": {**config["cv"], "folds": settings.recipe_folds}}
    head = [f"# The best trial ({best['number']}) of the hyper-parameter search in {out}:",
            f"# mean validation KL {_fmt(best['kl_mean'])} ± {_fmt(best['kl_std'])} over {best['folds_done']} "
            f"fold(s); its folds: {out / 'trials' / str(best['number'])}",
            *[f"#   {k}: {v}" for k, v in best["params"].items()],
            "# The whole resolved config; data.shards and the launcher section are those of the search, cv.folds "
            f"is the recipe's ({_folds(settings.recipe_folds)}), not the search's ({_folds(settings.folds)})."]
    text = "\n".join(head) + "\n" + yaml.safe_dump(config, sort_keys=False)
    write_bytes_atomic(out / BEST, text.encode())


# ----------------------------------------------------------------------------- plots

def draw(out: Path, rows: list[dict], best: dict | None) -> list[str]:
    if not rows:
        return []
    plot_history(rows, out / PLOTS["history"])
    plot_intermediate(rows, out / PLOTS["intermediate"])
    return list(PLOTS.values())


def plot_history(rows: list[dict], path: Path) -> None:
    """Each trial's KL by trial number (pruned ones at their last reported value), and the best so far."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    complete = [r for r in rows if r["state"] == "COMPLETE" and r["kl_mean"] is not None]
    pruned = [r for r in rows if r["state"] == "PRUNED" and r["value"] is not None]
    ax.plot([r["number"] for r in complete], [r["kl_mean"] for r in complete], "o", label="complete")
    ax.plot([r["number"] for r in pruned], [r["value"] for r in pruned], "x", color="grey",
            label="pruned (last reported)")
    best, xs, ys = math.inf, [], []
    for r in sorted(complete, key=lambda r: r["number"]):
        best = min(best, r["kl_mean"])
        xs.append(r["number"])
        ys.append(best)
    if xs:
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    ax.set(xlabel="trial", ylabel="mean validation KL", title="optimisation history")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


def plot_intermediate(rows: list[dict], path: Path) -> None:
    """What the pruner saw: each trial's reported values by step."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    colours = {"COMPLETE": "tab:blue", "PRUNED": "grey", "FAIL": "tab:red", "RUNNING": "tab:green"}
    for r in rows:
        steps = sorted((int(k), v) for k, v in r["intermediate"].items())
        if steps:
            ax.plot([s for s, _ in steps], [v for _, v in steps], "-o", markersize=3,
                    color=colours.get(r["state"], "black"), alpha=0.7)
    for state, colour in colours.items():
        ax.plot([], [], color=colour, label=state.lower())
    ax.set(xlabel="step (validated epochs)", ylabel="mean validation KL so far", title="intermediate values")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path, dpi=90)


# ----------------------------------------------------------------------------- text

def _fmt(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _folds(folds) -> str:
    return "every fold" if folds is None else ", ".join(map(str, folds))


def _value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _clock(seconds) -> str:
    if seconds is None:
        return "–"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def markdown(report: dict, settings: Settings) -> str:
    lines = [f"# Hyper-parameter search: {report['folder']}", "", _setup_line(report, settings), ""]
    lines += _best_section(report)
    lines += _trials_table(report, settings)
    lines += _importance_section(report)
    if report["plots"]:
        lines += ["## Plots", "", *[f"![{Path(p).stem}]({p})" for p in report["plots"]], ""]
    return "\n".join(lines)


def _setup_line(report: dict, settings: Settings) -> str:
    s = report["settings"]
    states = ", ".join(f"{n} {k.lower()}" for k, n in report["states"].items()) or "none yet"
    startup = f"startup {s['pruner_startup']} trials, " if s["pruner"] == "median" else ""   # the others have none
    pruner = s["pruner"] if s["pruner"] == "none" else \
        f"{s['pruner']} ({startup}warm-up {s['pruner_warmup']} epochs of every fold)"
    return (f"Recipe `{s['recipe'] or '(defaults)'}`, space `{s['space_file']}` ({', '.join(settings.space)}); "
            f"folds {', '.join(map(str, s['folds']))} ({s['fold_order']}); sampler {s['sampler']} (seed {s['seed']}); "
            f"pruner {pruner}; executor {s['executor']}, {s['parallel']} job(s) at once. "
            f"Trials: {len(report['trials'])} of {s['trials']} ({states}).")


def _best_section(report: dict) -> list[str]:
    best = report["best"]
    if best is None:
        return ["## Best trial", "", "No trial completed yet.", ""]
    lines = ["## Best trial", "",
             f"Trial {best['number']}: mean validation KL **{_fmt(best['kl_mean'])}** ± {_fmt(best['kl_std'])} "
             f"(std over {best['folds_done']} folds). Its config as a recipe: `{BEST}` "
             f"(`dist-lc cv --config {report['folder']}/{BEST} --out CVDIR`); its folds: `{best['folder']}/` "
             f"(`dist-lc report {report['folder']}/{best['folder']}` for the full CV report).", "",
             "| key | value |", "|---|---|", *[f"| {k} | {_value(v)} |" for k, v in best["params"].items()], ""]
    g = report["gap"]
    if "second" not in g:
        lines += [f"Second best: none ({g['reason']}).", ""]
        return lines
    text = (f"It is {_fmt(g['difference'])} below the second best (trial {g['second']})")
    if g["in_se_best"] is not None:
        text += f": {g['in_se_best']:.1f} × its fold noise (standard error std/√folds = {_fmt(g['se_best'])})"
    else:
        text += f" ({g['reason']})"
    if g["folds_paired"] >= 2:
        text += f"; fold by fold, better on {g['better_on']} of the {g['folds_paired']} folds both ran"
        if g["z"] is not None:
            text += f", the mean difference {g['z']:.1f} standard errors of the per-fold differences"
            text += (". Below about 2 these folds do not tell the two apart: compare them on more folds"
                     if g["z"] < 2 else "")
    return lines + [text + ".", ""]


def _trials_table(report: dict, settings: Settings) -> list[str]:
    keys = list(settings.space)
    head = ["trial", "state", *keys, "KL mean ± std", "folds", "wall time"]
    lines = ["## Trials", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["trials"]:
        kl = f"{_fmt(r['kl_mean'])} ± {_fmt(r['kl_std'])}" if r["kl_mean"] is not None else "–"
        if r["state"] == "PRUNED" and r["value"] is not None:
            kl += f" (pruned at {_fmt(r['value'])})"
        if r["unreadable"]:
            kl += " (results unreadable: see report.json)"
        cells = [str(r["number"]), r["state"].lower(), *[_value(r["params"].get(k, "–")) for k in keys], kl,
                 f"{r['folds_done']}/{r['folds_total']}", _clock(r["wall_s"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _importance_section(report: dict) -> list[str]:
    imp = report["importance"]
    lines = ["## Parameter importance (PED-ANOVA)", ""]
    if "values" not in imp:
        return lines + [f"Not computed: {imp['reason']}.", ""]
    return lines + [f"How much each key decides whether a trial is among the best {imp['top']:.0%} of the "
                    "completed ones.", "", "| key | importance |", "|---|---|",
                    *[f"| {k} | {v:.3f} |" for k, v in imp["values"].items()], ""]


def summary(report: dict) -> str:
    """What the command prints at its end."""
    states = ", ".join(f"{n} {k.lower()}" for k, n in report["states"].items())
    best = report["best"]
    lines = [f"trials: {len(report['trials'])} ({states})"]
    if best is not None:
        params = ", ".join(f"{k}={_value(v)}" for k, v in best["params"].items())
        lines.append(f"best trial {best['number']}: KL {_fmt(best['kl_mean'])} ± {_fmt(best['kl_std'])} over "
                     f"{best['folds_done']} fold(s) ({params})")
        lines.append(f"best recipe: {report['folder']}/{BEST}")
    lines.append(f"report: {report['folder']}/{REPORT_MD}")
    return "\n".join(lines)
