"""Tables of ``benchmarks/quality_compare.py``: per-row scores (per seed where a mean would hide them), seed-paired
gaps to the reference row with their t-intervals ("inconclusive" where one contains 0), the dense probe per level."""

from __future__ import annotations

import statistics
from typing import Any

from backbone_kd.probe.report import gap
from backbone_kd.probe.stats import seed_paired_difference

# (label in the gaps table, path into a row): every gap is the seed-paired difference of these per-seed values
GAP_METRICS = (
    ("det mAP50-95 last5", ("det_last5", "map50_95")),
    ("det mAP50-95 last5, SPPF trained", ("det_pre_last5", "map50_95")),
    ("fine-tuned mAP50-95 last5", ("ft_last5", "map50_95")),
    ("dense AP", ("dense", "objectness_ap")),
    ("dense bAcc", ("dense", "class_bacc")),
    ("dense P5 AP", ("dense", "per_level", "P5", "objectness_ap")),
    ("dense P5pre AP", ("dense", "per_level", "P5pre", "objectness_ap")),
)


def _ms(values: list[float]) -> dict[str, Any]:
    """Mean, sample std and count, plus the values in seed order (a two-seed mean hides which seed moved)."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "n": len(values),
        "values": list(values),
    }


def _get(row: dict, path: tuple[str, ...]) -> dict | None:
    for key in path:
        row = row.get(key) if isinstance(row, dict) else None
    return row


def gaps(row: dict, ref: dict) -> dict:
    """``{label: seed_paired_difference}`` of ``row - ref`` for every :data:`GAP_METRICS` entry both rows have."""
    out = {}
    for label, path in GAP_METRICS:
        a, b = _get(row, path), _get(ref, path)
        if a and b and "seeds" in a and "seeds" in b:
            out[label] = seed_paired_difference(dict(zip(a["seeds"], a["values"])), dict(zip(b["seeds"], b["values"])))
    return out


def f(d: dict | None, digits: int = 3, seeds: bool = False) -> str:
    """``mean ± std``; with ``seeds``, the per-seed values in brackets (a small gap needs them)."""
    if not d:
        return "—"
    if d.get("n", 1) <= 1:
        return f"{d['mean']:.{digits}f}"
    text = f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"
    if seeds and d.get("values"):
        text += " (" + " / ".join(f"{v:.{digits}f}" for v in d["values"]) + ")"
    return text


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown rows; columns empty in every row (a probe that did not run) are left out."""
    keep = [0] + [i for i in range(1, len(head)) if any(r[i] != "—" for r in rows)]
    head, rows = [head[i] for i in keep], [[r[i] for i in keep] for r in rows]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def main_table(out: dict) -> list[str]:
    """One row per backbone: detection probe, fine-tuning, k-NN / linear, pretraining speed."""
    head = ["row", "det mAP50-95 last5", "det mAP50-95 (final)", "det mAP50 (final)", "det mAP50-95 (best)"]
    head += ["fine-tuned mAP50-95", "k-NN 10", "k-NN 20", "linear", "per-level linear", "pretrain wall s", "img/s"]
    rows = []
    for name, r in out["rows"].items():
        pre = r.get("pretrain") or {}
        levels = r.get("per_level_linear", {})
        rows.append(
            [
                name,
                f(r.get("det_last5", {}).get("map50_95"), 4, seeds=True),
                f(r.get("det_final", {}).get("map50_95"), 4, seeds=True),
                f(r.get("det_final", {}).get("map50"), 4),
                f(r.get("det_best", {}).get("map50_95"), 4),
                f((r.get("ft_last5") or r.get("ft_final") or {}).get("map50_95"), 4, seeds=True),
                f(r.get("knn10")),
                f(r.get("knn20")),
                f(r.get("linear")),
                " / ".join(f"{k} {v['mean']:.3f}" for k, v in levels.items()) or "—",
                f(pre.get("wall_s"), 0),
                f"{pre['img_per_s']:.1f}" if pre.get("img_per_s") else "—",
            ]
        )
    return _table(head, rows)


def gap_table(out: dict) -> list[str]:
    """Seed-paired gaps of every row to the reference row."""
    labels = [lab for lab, _ in GAP_METRICS if any(lab in r.get("vs_ref", {}) for r in out["rows"].values())]
    if not labels:
        return []
    rows = [[name] + [gap(r["vs_ref"].get(lab), 4) for lab in labels] for name, r in out["rows"].items()]
    head = ["row"] + [f"Δ {lab} vs {out['ref']} [95% t-CI]" for lab in labels]
    note = "Gaps: paired by seed, 95 % t-interval over seeds (df = seeds - 1); inconclusive where it contains 0."
    return ["", *_table(head, rows), "", note]


def dense_table(out: dict) -> list[str]:
    """Dense probe per row: combined objectness AP and class bAcc (per seed), objectness AP per level."""
    dense = {n: r["dense"] for n, r in out["rows"].items() if "dense" in r}
    if not dense:
        return []
    levels = list(next(iter(dense.values())).get("per_level", {}))
    head = ["row", "dense AP", "dense bAcc"] + [f"{lv} AP" for lv in levels]
    rows = [
        [n, f(d.get("objectness_ap"), 3, True), f(d.get("class_bacc"), 3, True)]
        + [f(d.get("per_level", {}).get(lv, {}).get("objectness_ap")) for lv in levels]
        for n, d in dense.items()
    ]
    return ["", *_table(head, rows)]


def notes(out: dict) -> list[str]:
    """Footnotes: data, fairness, probe protocols, the lr sweep."""
    st, lines = out["settings"], [""]
    if out.get("crops"):
        c = out["crops"]
        how = f"{st['cv']}-fold CV over all crops (grouped by photo)" if st.get("cv") else "on the val crops"
        lines.append(
            f"Crops: {c['classes']} classes, {c['train_images']} train / {c['val_images']} val, majority-class "
            f"accuracy {c['val_majority_acc']:.3f}; k-NN / linear by {how}."
        )
    lines.append(f"Images seen per pretraining run: {out['images_seen']}.")
    if out.get("fairness"):
        fa = out["fairness"]
        lines.append(
            f"Pretraining pool: {fa['pool']['roots']} ({fa['pool']['images']} images), disjoint from the "
            f"{fa['probe_images']} probe images ({fa['compared']}); frozen probes P5: {fa['p5']}."
        )
    if "det" in out.get("probes", {"det": None}):  # JSON from before "probes" always ran it
        lines.append(
            f"Detection probe: frozen {'backbone + neck' if st.get('det_freeze') == 'neck' else 'backbone'}, "
            f"{'class-agnostic' if st.get('det_single_cls') else '80-class'}, {st.get('det_epochs')} epochs at "
            f"{st.get('det_imgsz')} px on the coco128 split (train96 -> val32); last5 = mean of the last "
            f"{st.get('det_last', 5)} epochs."
        )
    for row, rec in (out.get("sweep") or {}).items():
        if isinstance(rec, dict) and "chosen" in rec:
            pts = ", ".join(f"{float(lr):g}: {p['objectness_ap']:.4f}" for lr, p in rec["points"].items())
            lines.append(f"lr sweep {row}: chose {rec['chosen']:g} (default {rec['default']:g}; train96 CV AP {pts}).")
    return lines


def markdown(out: dict) -> str:
    """The report: main table, gaps to the reference row, dense table, notes (old JSON renders its columns)."""
    main = main_table(out)
    main = main if main[0].count("|") > 2 else []  # "| row |" alone: no probe of this table ran
    return "\n".join(main + gap_table(out) + dense_table(out) + notes(out))
