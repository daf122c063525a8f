"""Statistics, verdicts, table and plot of benchmarks/quality.py.

Paired differences: for every test prompt and seed, SWITCH's score minus the method's (the same
prompt, the same seed of distillation), averaged; 95% intervals by a bootstrap that resamples
prompts and seeds independently (percentile method).
"""

from __future__ import annotations

import statistics

import numpy as np

from switchkd.training.evaluate import bucket_names as evaluate_bucket_names
from switchkd.training.evaluate import length_bucket

BUCKETS = (32, 96, 192)
PLOT_EDGES = (0, 16, 32, 64, 96, 128, 160, 192, 240, 300)
N_BOOT = 2000
BASELINES = ("SFT", "KD", "SeqKD", "GKD", "DistiLLM", "SKD")
ABLATIONS = ("SWITCH-linear", "SWITCH-constant")


def bucket(length: int, edges=BUCKETS) -> str:
    return length_bucket(length, edges)


def bucket_names(edges=BUCKETS):
    return evaluate_bucket_names(edges)


def _stats(values):
    values = [v for v in values if v is not None and v == v]
    return {"mean": statistics.mean(values) if values else float("nan"),
            "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def _mean(values, mask):
    chosen = [v for v, m in zip(values, mask, strict=True) if m]
    return sum(chosen) / len(chosen) if chosen else float("nan")


def scores(rows, lengths):
    """Mean ROUGE-L and exact match of one run's per-prompt rows, overall and by reference length."""
    out = {"overall": {"n": len(lengths), "rougeL": _mean(rows["rougeL"], [True] * len(lengths)),
                       "exact_match": _mean(rows["exact"], [True] * len(lengths))}, "by_length": {}}
    for name in bucket_names():
        mask = [bucket(n) == name for n in lengths]
        out["by_length"][name] = {"n": sum(mask), "rougeL": _mean(rows["rougeL"], mask),
                                  "exact_match": _mean(rows["exact"], mask)}
    return out


def summarise(runs):
    """Mean and population spread over seeds of every score of one method."""
    first = runs[0]["scores"]
    return {
        "rougeL": _stats([r["scores"]["overall"]["rougeL"] for r in runs]),
        "exact_match": _stats([r["scores"]["overall"]["exact_match"] for r in runs]),
        "by_length": {b: _stats([r["scores"]["by_length"][b]["rougeL"] for r in runs]) for b in first["by_length"]},
        "teacher_share": _stats([r["teacher_share"] for r in runs]),
        "seconds": _stats([r["seconds"] for r in runs]),
    }


def _interval(means, diff):
    return {"mean": float(diff.mean()), "low": float(np.percentile(means, 2.5)),
            "high": float(np.percentile(means, 97.5))}


def bootstrap(diff, rng):
    """Mean of ``diff`` [seeds, prompts] with a 95% interval over resampled seeds and prompts."""
    n_seeds, n_prompts = diff.shape
    s = rng.integers(0, n_seeds, (N_BOOT, n_seeds))
    p = rng.integers(0, n_prompts, (N_BOOT, n_prompts))
    return {**_interval(diff[s[:, :, None], p[:, None, :]].mean(axis=(1, 2)), diff), "n_prompts": n_prompts,
            "n_seeds": n_seeds}


def bootstrap_gap(long, short, rng):
    """(mean of ``long``) - (mean of ``short``), both [seeds, prompts of a bucket], seeds resampled jointly."""
    n_seeds = long.shape[0]
    s = rng.integers(0, n_seeds, (N_BOOT, n_seeds))
    pl = rng.integers(0, long.shape[1], (N_BOOT, long.shape[1]))
    ps = rng.integers(0, short.shape[1], (N_BOOT, short.shape[1]))
    means = long[s[:, :, None], pl[:, None, :]].mean(axis=(1, 2)) - short[s[:, :, None], ps[:, None, :]].mean(
        axis=(1, 2))
    return {"mean": float(long.mean() - short.mean()), "low": float(np.percentile(means, 2.5)),
            "high": float(np.percentile(means, 97.5))}


def paired(switch_runs, runs, lengths, seed=0):
    """SWITCH minus ``runs`` (same seeds, same prompts): ROUGE-L and exact match overall, ROUGE-L by
    bucket, and the longest-minus-shortest bucket gap of the ROUGE-L difference."""
    rng = np.random.default_rng(seed)
    by_seed = {r["seed"]: r["rows"] for r in runs}
    seeds = [r["seed"] for r in switch_runs if r["seed"] in by_seed]
    diff = {key: np.array([[a - b for a, b in zip(r["rows"][key], by_seed[r["seed"]][key], strict=True)]
                           for r in switch_runs if r["seed"] in by_seed]) for key in ("rougeL", "exact")}
    names = np.array([bucket(n) for n in lengths])
    out = {"seeds": seeds, "rougeL": bootstrap(diff["rougeL"], rng), "exact_match": bootstrap(diff["exact"], rng),
           "by_length": {}}
    for name in bucket_names():
        if (names == name).any():
            out["by_length"][name] = bootstrap(diff["rougeL"][:, names == name], rng)
    first, last = bucket_names()[0], bucket_names()[-1]
    if (names == first).any() and (names == last).any():
        out["long_minus_short"] = bootstrap_gap(diff["rougeL"][:, names == last], diff["rougeL"][:, names == first],
                                                rng)
    return out


def _verdict(ci):
    if ci["low"] > 0:
        return "supported"
    if ci["high"] < 0:
        return "contradicted"
    return "not resolved"


def _fmt_ci(ci, scale=100):
    return f"{scale * ci['mean']:+.1f} [{scale * ci['low']:+.1f}, {scale * ci['high']:+.1f}]"


def regime(report):
    """The checks that the run is in the paper's regime (teacher right, SFT student start close but below it)."""
    teacher, sft, last = report["teacher"], report["start"], bucket_names()[-1]
    ratio = sft["overall"]["rougeL"] / teacher["overall"]["rougeL"]
    t_em, s_em = 100 * teacher["overall"]["exact_match"], 100 * sft["overall"]["exact_match"]
    t_long, s_long = 100 * teacher["by_length"][last]["rougeL"], 100 * sft["by_length"][last]["rougeL"]
    checks = [("teacher exact match >= 0.5", t_em >= 50, f"{t_em:.1f}%"),
              ("SFT student start ROUGE-L >= 0.6 x teacher's", ratio >= 0.6, f"{ratio:.2f} x"),
              ("SFT student start below the teacher on exact match", s_em < t_em, f"{s_em:.1f} vs {t_em:.1f}"),
              (f"SFT student start below the teacher on ROUGE-L {last}", s_long < t_long,
               f"{s_long:.1f} vs {t_long:.1f}")]
    return [{"check": c, "holds": bool(h), "value": v} for c, h, v in checks]


def claims(report):
    """Per compared method: verdicts of "SWITCH beats it" overall and on the longest references, and of
    "SWITCH's gain over it grows with reference length": supported (interval above 0), contradicted
    (below 0) or not resolved."""
    out = []
    for name, cmp in report["paired"].items():
        row = {"method": name, "kind": "ablation" if name in ABLATIONS else "baseline",
               "beats_overall": _claim(cmp["rougeL"])}
        if bucket_names()[-1] in cmp["by_length"]:
            row["beats_longest"] = _claim(cmp["by_length"][bucket_names()[-1]])
        if "long_minus_short" in cmp:
            row["gain_grows_with_length"] = _claim(cmp["long_minus_short"])
        out.append(row)
    return out


def summary(report) -> str:
    """One paragraph: is the run in the paper's regime, and which claims it supports, contradicts or leaves open."""
    labels = {"beats_overall": "SWITCH beats {} on ROUGE-L",
              "beats_longest": "SWITCH beats {} on the longest references",
              "gain_grows_with_length": "SWITCH's gain over {} grows with reference length"}
    found = {"supported": [], "contradicted": [], "not resolved": []}
    for c in report["claims"]:
        for key, label in labels.items():
            if key in c:
                found[c[key]["verdict"]].append(label.format(c["method"]))
    in_regime = all(c["holds"] for c in report["regime"])
    text = ["In the paper's regime (every check above holds)." if in_regime else
            "NOT in the paper's regime (a check above fails): the verdicts do not test the paper's claim."]
    for verdict in ("supported", "contradicted"):
        text.append(f"{verdict.capitalize()} ({len(found[verdict])}): " + ("; ".join(found[verdict]) or "none") + ".")
    text.append(f"Not resolved: the other {len(found['not resolved'])} of {sum(map(len, found.values()))} claims.")
    return " ".join(text)


def _claim(ci):
    return {"verdict": _verdict(ci), "difference": _fmt_ci(ci)}


def markdown(report) -> str:
    buckets = bucket_names()
    head = ["method", "ROUGE-L", "exact", *[f"R-L {b}" for b in buckets], "teacher share", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]

    def fmt(s, scale=100, digits=1):
        if s["mean"] is None or s["mean"] != s["mean"]:
            return "-"
        return f"{scale * s['mean']:.{digits}f} ± {scale * s['std']:.{digits}f}"

    for name, m in report["methods"].items():
        cells = [name, fmt(m["rougeL"]), fmt(m["exact_match"]), *[fmt(m["by_length"][b]) for b in buckets],
                 fmt(m["teacher_share"], 1, 2), f"{m['seconds']['mean']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for label, key in (("student start (SFT, before any method)", "start"), ("teacher", "teacher")):
        ref = report[key]
        lines.append(f"| {label} | {100 * ref['overall']['rougeL']:.1f} | {100 * ref['overall']['exact_match']:.1f}"
                     " | " + " | ".join(f"{100 * ref['by_length'][b]['rougeL']:.1f}" for b in buckets) + " | - | - |")
    teacher = report["teacher"]
    counts = " | ".join(str(teacher["by_length"][b]["n"]) for b in buckets)
    lines.append(f"| test prompts |  |  | {counts} |  |  |")
    return "\n".join(lines + _paired_table(report) + _verdicts(report) + _sweep_table(report))


def _paired_table(report):
    if not report["paired"]:
        return []
    buckets = bucket_names()
    head = ["SWITCH minus", "ROUGE-L", "exact", *[f"R-L {b}" for b in buckets], f"gap {buckets[-1]} − {buckets[0]}"]
    lines = ["", "Paired differences, SWITCH minus each method (points; mean [95% bootstrap interval] over test "
                 "prompts and seeds):", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for name, cmp in report["paired"].items():
        cells = [name, _fmt_ci(cmp["rougeL"]), _fmt_ci(cmp["exact_match"]),
                 *[_fmt_ci(cmp["by_length"][b]) if b in cmp["by_length"] else "-" for b in buckets],
                 _fmt_ci(cmp["long_minus_short"]) if "long_minus_short" in cmp else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _verdicts(report):
    lines = ["", "Regime checks:", ""]
    lines += [f"- {c['check']}: {'yes' if c['holds'] else 'NO'} ({c['value']})" for c in report["regime"]]
    if not report["claims"]:
        return lines
    lines += ["", summary(report)]
    first, last = bucket_names()[0], bucket_names()[-1]
    lines += ["", "Claims, per compared method (supported: 95% interval of SWITCH minus it above 0; contradicted: "
                  "below 0; otherwise not resolved):", "",
              f"| method | SWITCH beats it (ROUGE-L) | ... on references of {last} tokens | SWITCH's gain grows with "
              f"length ({last} vs {first}) |", "| --- | --- | --- | --- |"]
    for c in report["claims"]:
        cells = [c["method"], *[f"**{c[k]['verdict']}** {c[k]['difference']}" if k in c else "-"
                                for k in ("beats_overall", "beats_longest", "gain_grows_with_length")]]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _sweep_table(report):
    if not report["sweep"]:
        return []
    lines = ["", "Validation sweep of SWITCH (seed 0):", "",
             "| tau0 | decay | loss | val ROUGE-L | teacher share |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {t['tau0']} | {t['decay']} | {t['loss_kind']} | {100 * t['validation_rougeL']:.1f} | "
              f"{t['teacher_share']:.2f} |" for t in report["sweep"]]
    chosen = report["chosen"]
    return lines + ["", f"Chosen: tau0={chosen['tau0']}, decay={chosen['decay']}, {chosen['loss_kind']}."]


def curve(rows_by_seed, lengths):
    """(mean reference length, mean ROUGE-L) per PLOT_EDGES bin over all seeds and prompts."""
    points = []
    for low, high in zip(PLOT_EDGES, PLOT_EDGES[1:], strict=False):
        idx = [i for i, n in enumerate(lengths) if low <= n < high]
        if idx:
            values = [rows[i] for rows in rows_by_seed for i in idx]
            points.append((statistics.mean(lengths[i] for i in idx), statistics.mean(values)))
    return points


def plot(report, runs, reference_rows, lengths, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, method_runs in runs.items():
        xs, ys = zip(*curve([r["rows"]["rougeL"] for r in method_runs], lengths), strict=True)
        ax.plot(xs, [100 * y for y in ys], marker="o", label=name, linewidth=2.5 if name == "SWITCH" else 1.2)
    for key, style in (("teacher", "k--"), ("start", "k:")):
        xs, ys = zip(*curve([reference_rows[key]["rougeL"]], lengths), strict=True)
        ax.plot(xs, [100 * y for y in ys], style, label="student start (SFT)" if key == "start" else key)
    ax.set_xlabel("reference length (tokens; bins " + ", ".join(map(str, PLOT_EDGES)) + ")")
    ax.set_ylabel("ROUGE-L F (test, mean over seeds)")
    ax.set_title(f"Student quality by reference length ({report['mode']} run)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
