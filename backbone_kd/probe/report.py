"""Markdown tables of ``bkd probe``: k-NN / linear, detection probe, dense probe. Every gap is printed with its paired
interval, and with the word "inconclusive" where that interval contains 0."""

from __future__ import annotations

import math


def gap(d: dict | None, digits: int = 3) -> str:
    """``+0.012 [+0.004, +0.020]`` of a paired difference (``{"diff", "ci", "inconclusive"}``), "inconclusive" after
    it where the interval contains 0; "—" when there is none."""
    if not d or d.get("diff") is None:
        return "—"
    text = f"{d['diff']:+.{digits}f}"
    if d.get("ci"):
        text += f" [{d['ci'][0]:+.{digits}f}, {d['ci'][1]:+.{digits}f}]"
    return text + (" inconclusive" if d.get("inconclusive") else "")


def _with_ci(row: dict, probe: str) -> str:
    """``0.612 [0.55, 0.67]`` (JSON from before the intervals has none: the value alone)."""
    ci = row.get("ci", {}).get(probe)
    return f"{row[probe]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _det_regime(settings: dict) -> str:
    """What the detection probe trained, for the table's footnote (older JSON has no ``freeze``: backbone)."""
    if settings["full"]:
        return "full fine-tuning"
    if settings.get("freeze") == "neck":
        return "frozen backbone + neck, head trained"
    return "frozen backbone, neck+head trained"


def classification_markdown(result: dict) -> str:
    """k-NN / linear table: a row per backbone, intervals, balanced accuracy, per level, and the paired gap in linear
    balanced accuracy to the first row."""
    rows = result["backbones"]
    names = list(rows)
    levels = next((list(r.get("per_level", {})) for r in rows.values()), [])
    head = ["backbone", "k-NN 10 [95% CI]", "k-NN 20 [95% CI]", "linear [95% CI]", "bAcc k-NN 20 / linear"]
    head += [f"{lv} linear" for lv in levels] + [f"Δ linear bAcc vs {names[0]} [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [name] + [_with_ci(r, probe) for probe in ("knn10", "knn20", "linear")]
        cells.append(f"{r.get('knn20_bacc', math.nan):.3f} / {r.get('linear_bacc', math.nan):.3f}")
        per_level = r.get("per_level", {})
        cells += [f"{per_level[lv]['linear']:.3f}" if lv in per_level else "—" for lv in levels]
        cells.append(gap(r.get("vs", {}).get(names[0], {}).get("linear_bacc")))
        lines.append("| " + " | ".join(cells) + " |")
    d = result["data"]
    how = f"{d['cv_folds']}-fold cross-validation over both" if d.get("cv_folds") else "scored on val"
    lines.append(
        f"\n{d['classes']} classes, {d['train_images']} train / {d['val_images']} val images at "
        f"{d['imgsz']} px ({how}); val majority-class accuracy {d['val_majority_acc']:.3f}, balanced accuracy "
        f"chance {1 / d['classes']:.3f}; features standardised with train statistics before k-NN and linear; "
        "95 % bootstrap intervals over source images, the same resamples for every row (paired gaps)."
    )
    return "\n".join(lines)


def det_markdown(det: dict) -> str:
    """Detection-probe table: last-k mean (the measurement, per seed), final and best epoch, and the seed-paired gap
    to the first row with its t-interval."""
    s, rows = det["settings"], det["backbones"]
    names = list(rows)
    label = f"last{s.get('last_k', 5)}"
    head = [
        "row",
        f"mAP50-95 {label} (per seed)",
        f"mAP50 {label}",
        "mAP50-95 final",
        "mAP50-95 best",
        f"Δ mAP50-95 {label} vs {names[0]} [95% t-CI]",
        f"Δ mAP50 {label} vs {names[0]} [95% t-CI]",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():

        def ms(lab: str, metric: str, seeds: bool = False, r: dict = r) -> str:
            v = r.get(lab, {}).get(metric)
            if not v:
                return "—"
            text = f"{v['mean']:.4f} ± {v['std']:.4f}"
            return text + (" (" + " / ".join(f"{x:.4f}" for x in v["values"]) + ")" if seeds and "values" in v else "")

        # a NAME-p5pre row (--p5 both) is compared with the first row of its own regime, not across regimes
        ref = next(n for n in names if rows[n].get("p5", "post") == r.get("p5", "post"))
        vs = r.get("vs", {}).get(ref, {})
        cells = [name, ms(label, "map50_95", True), ms(label, "map50"), ms("final", "map50_95")]
        cells += [ms("best", "map50_95"), gap(vs.get("map50_95"), 4), gap(vs.get("map50"), 4)]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(
        f"\nDetection probe: {_det_regime(s)}, {'class-agnostic, ' if s.get('single_cls') else ''}"
        f"{s['epochs']} epochs at {s['imgsz']} px, seeds {list(s['seeds'])}; {label} = mean of the last "
        f"{s.get('last_k', 5)} epochs of a run (mean ± std over seeds); gaps paired by seed (same neck/head init), "
        "95 % t-interval over seeds; best = best epoch on the scored split (optimistic)."
        + (
            " `-p5pre` rows: SPPF trained with the neck from the shared init; their gaps are to the first -p5pre row."
            if s.get("p5") == "both"
            else ""
        )
    )
    return "\n".join(lines)


def _fmt(value: float, ci: list[float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def dense_markdown(result: dict) -> str:
    """The dense table: a row per backbone, combined metrics with intervals, paired differences vs the first row,
    and each level's point values; a footnote states the protocol and marks rows that have seen the labels."""
    rows = {n: r["dense"] for n, r in result["backbones"].items() if "dense" in r}
    s = result["settings"]["dense"]
    names = list(rows)
    levels = list(rows[names[0]]["per_level"])
    head = ["backbone", "objectness AP [95% CI]", "class bAcc [95% CI]", f"Δ AP vs {names[0]}", f"Δ bAcc vs {names[0]}"]
    head += [f"{lv} AP / bAcc" for lv in levels] + ["s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        cells = [f"{name} †" if r["seen_labels"] else name]
        cells += [_fmt(r[m], r["ci"][m]) for m in ("objectness_ap", "class_bacc")]
        cells += [gap(r["vs"].get(names[0], {}).get("combined", {}).get(m)) for m in ("objectness_ap", "class_bacc")]
        cells += [
            f"{r['per_level'][lv]['objectness_ap']:.3f} / {r['per_level'][lv]['class_bacc']:.3f}"
            if lv in r["per_level"]
            else "—"
            for lv in levels
        ]
        lines.append("| " + " | ".join(cells + [f"{r['seconds']:.0f}"]) + " |")
    p5 = {"pre": " P5 read before SPPF.", "both": " P5pre = before SPPF (not in combined)."}.get(
        s.get("p5", "post"), ""
    )
    lines.append(
        f"\nDense probe: {s['images']} images at {s['imgsz']} px, {s['folds']}-fold grouped by image, "
        f"{s['resamples']} paired bootstrap resamples over images; objectness AP of a constant scorer = positive rate "
        f"{s['positive_rate']['combined']:.3f} (combined grid), class bAcc chance 0.5 over "
        f"{len(s['classes_scored'])} classes ({', '.join(s['classes_scored'])}; >= {s['min_locations']} cells in "
        f"every fold). Combined: {s['combined']}.{p5}"
    )
    if any(r["seen_labels"] for r in rows.values()):
        lines.append("† its weights were trained with labels on these images (an optimistic reference).")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    """Every table the result holds (k-NN / linear, detection, dense), separated by blank lines."""
    parts = []
    if result.get("data"):
        parts.append(classification_markdown(result))
    if result.get("det"):
        parts.append(det_markdown(result["det"]))
    if any("dense" in r for r in result["backbones"].values()):
        parts.append(dense_markdown(result))
    return "\n\n".join(parts)
