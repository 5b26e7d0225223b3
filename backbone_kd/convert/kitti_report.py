"""What one KITTI -> YOLO conversion did: per-class box counts, every dropped item, and their JSON / text forms.

Filled in by :func:`backbone_kd.convert.kitti.convert_kitti` and written beside the output as
``conversion_report.json``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field, fields


@dataclass
class Issue:
    """A label line that was not converted: ``file:line`` plus the offending text and why."""

    file: str
    line: int
    text: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}: {self.text!r}"


@dataclass
class ConversionReport:
    """Counts and issues of one conversion; ``to_dict`` is what ``conversion_report.json`` holds."""

    src: str
    out: str
    classes: list[str]
    merge: dict[str, str]
    val_fraction: float
    seed: int
    symlink: bool
    data_yaml: str = ""
    images: Counter = field(default_factory=Counter)  # split -> images written
    background_images: Counter = field(default_factory=Counter)  # split -> images with an empty label file
    boxes: dict[str, Counter] = field(default_factory=dict)  # class -> split -> boxes
    dropped: Counter = field(default_factory=Counter)  # KITTI type -> objects dropped (DontCare / unlisted)
    merged: Counter = field(default_factory=Counter)  # "Van->Car" -> objects renamed
    clipped: int = 0
    degenerate: list[Issue] = field(default_factory=list)
    malformed: list[Issue] = field(default_factory=list)
    missing_labels: list[str] = field(default_factory=list)  # images without a label file (kept as background)
    missing_images: list[str] = field(default_factory=list)  # label files without an image (skipped)
    unreadable_images: list[str] = field(default_factory=list)
    split_by: str = "frame"  # frame (stem hash) | drive (hash of each frame's drive) | lists (fixed id lists)
    split_groups: Counter = field(default_factory=Counter)  # split -> drives (split_by="drive")
    unlisted_images: list[str] = field(default_factory=list)  # images in neither split list (skipped)
    listed_missing: list[str] = field(default_factory=list)  # ids in the split lists without an image

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        # asdict() would rebuild Counters from (key, value) pairs and count the pairs, so convert field by field.
        d = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "boxes":
                v = {c: {"train": n["train"], "val": n["val"]} for c, n in v.items()}
            elif isinstance(v, Counter):
                v = dict(v)
            elif f.name in ("degenerate", "malformed"):
                v = [asdict(i) for i in v]
            d[f.name] = v
        return d

    def summary(self, max_issues: int = 10) -> str:
        """Human-readable summary: per-class box counts per split, then every kind of dropped item."""
        lines = [f"KITTI -> YOLO: {self.src} -> {self.out}", f"{'class':<16}{'train':>8}{'val':>8}{'total':>8}"]
        for name in self.classes:
            c = self.boxes.get(name, Counter())
            lines.append(f"{name:<16}{c['train']:>8}{c['val']:>8}{c['train'] + c['val']:>8}")
        im, bg = self.images, self.background_images
        lines.append(
            f"images: train {im['train']} val {im['val']} (background, no kept box: {bg['train'] + bg['val']})"
        )
        if self.split_by == "drive":
            g = self.split_groups
            lines.append(f"split by drive (drives: train {g['train']} val {g['val']}; no drive in both splits)")
        elif self.split_by == "lists":
            lines.append(
                f"split from lists: {len(self.unlisted_images)} image(s) in neither list skipped, "
                f"{len(self.listed_missing)} listed id(s) without an image"
            )
        else:
            lines.append("split by frame (hash of the file stem)")
        if self.merged:
            lines.append("merged: " + ", ".join(f"{k} {v}" for k, v in sorted(self.merged.items())))
        if self.dropped:
            lines.append("dropped by class: " + ", ".join(f"{k} {v}" for k, v in sorted(self.dropped.items())))
        lines.append(f"clipped to image: {self.clipped}; outside/zero-area after clipping: {len(self.degenerate)}")
        lines.append(f"malformed lines: {len(self.malformed)}")
        for title, items in (("malformed", self.malformed), ("outside/zero-area", self.degenerate)):
            lines += [f"  {title}: {i}" for i in items[:max_issues]]
            if len(items) > max_issues:
                lines.append(f"  ... {len(items) - max_issues} more {title} in the JSON report")
        for title, items in (
            ("images without label file (kept as background)", self.missing_labels),
            ("label files without image (skipped)", self.missing_images),
            ("unreadable images (skipped)", self.unreadable_images),
            ("images in neither split list (skipped)", self.unlisted_images),
            ("split-list ids without an image", self.listed_missing),
        ):
            if items:
                lines.append(f"{title}: {len(items)}, e.g. {', '.join(items[:5])}")
        if self.data_yaml:
            lines.append(f"data YAML: {self.data_yaml}")
        return "\n".join(lines)
