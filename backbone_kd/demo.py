"""``bkd demo``: the whole path on an embedded default — pretrain -> inject -> fine-tune one short epoch.

The demo dataset is generated, not downloaded: coloured rectangles and ellipses on textured backgrounds (2 classes,
YOLO labels), deterministic from a seed. Its images are the unlabeled set of stage 1 and the labeled set of stage 2.

With a reachable model hub the teacher is the real default (DINOv2 ViT-S/14). Offline, the demo says so loudly and
falls back to a *random-init* ViT-S/14: an install check that exercises every code path, not a useful backbone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from backbone_kd.io_utils import atomic_write, atomic_write_text
from backbone_kd.teachers.weights import hub_reachable

NAMES = {0: "rectangle", 1: "ellipse"}
BANNER = "!" * 100


def make_shapes_dataset(root: Path, n_train: int = 32, n_val: int = 8, size: int = 160, seed: int = 0) -> Path:
    """Write a YOLO-format dataset of random shapes under ``root``; returns its data YAML path."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            noise = rng.integers(0, 60, (size, size, 3), dtype=np.uint8) + rng.integers(60, 160, 3, dtype=np.uint8)
            image = Image.fromarray(noise.astype(np.uint8))
            draw = ImageDraw.Draw(image)
            lines = []
            for _ in range(int(rng.integers(1, 4))):
                cls = int(rng.integers(0, 2))
                w, h = rng.integers(size // 6, size // 2, 2)
                x0, y0 = rng.integers(0, size - w), rng.integers(0, size - h)
                colour = tuple(int(c) for c in rng.integers(0, 256, 3))
                box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
                (draw.rectangle if cls == 0 else draw.ellipse)(box, fill=colour)
                lines.append(f"{cls} {(x0 + w / 2) / size:.6f} {(y0 + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}")
            # atomic writes: a link planted in a reused folder is replaced, its target never written
            atomic_write(root / "images" / split / f"{i:04d}.jpg", lambda p, im=image: im.save(p, "JPEG", quality=92))
            atomic_write_text("\n".join(lines) + "\n", root / "labels" / split / f"{i:04d}.txt")
    data = {"path": str(root.resolve()), "train": "images/train", "val": "images/val", "names": NAMES}
    path = root / "shapes.yaml"
    atomic_write_text(yaml.safe_dump(data, sort_keys=False), path)
    return path


def main(argv: list[str] | None = None) -> int:
    """Run the demo; ``--out`` (default ``runs/demo``) receives every artifact."""
    parser = argparse.ArgumentParser(
        prog="bkd demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/demo", help="folder for the dataset, weights and runs")
    parser.add_argument("--steps", type=int, default=20, help="stage-1 optimizer steps")
    parser.add_argument("--imgsz", type=int, default=128, help="image size for both stages (multiple of 32)")
    parser.add_argument("--epochs", type=int, default=1, help="fine-tuning epochs")
    parser.add_argument("--offline", action="store_true", help="skip the hub check: random-init teacher")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    data_yaml = make_shapes_dataset(out / "shapes")
    # [n/3] counts the three stages (pretrain -> inject -> fine-tune); the dataset and the probe are labelled apart
    print(f"[data] demo dataset: {data_yaml}")

    online = not args.offline and hub_reachable()
    if not online:
        print(
            f"\n{BANNER}\nOFFLINE: the model hub is unreachable, so the teacher is a RANDOM-INIT ViT-S/14.\n"
            "This run is an install check of every code path; its backbone is NOT useful. For real pretraining\n"
            "pass --teacher-weights dinov2_vits14_pretrain.pth to `bkd pretrain`.\n" + BANNER + "\n"
        )
    run_dir = _pretrain(out, args.imgsz, args.steps, online)
    print(f"[1/3] stage 1 done: {run_dir / 'backbone.safetensors'}")

    from backbone_kd.inject import inject_backbone

    injected = out / "yolov8n-distilled.pt"
    report = inject_backbone(
        run_dir / "backbone.safetensors", "yolov8n.yaml", out=injected, data=str(data_yaml), force=True, verbose=False
    )
    print(f"[2/3] injected: {report.tensors_copied} tensors -> {injected}")
    _finetune(injected, data_yaml, out / "finetune", args.imgsz, args.epochs)
    print(f"[3/3] fine-tuned: {out / 'finetune' / 'train' / 'weights' / 'last.pt'}")
    _probe(run_dir / "backbone.safetensors", data_yaml, out / "probe")
    print(f"[probe] frozen-backbone k-NN / linear accuracy on the shapes' crops: {out / 'probe' / 'probe.json'}")
    print(
        f"\nartifacts under {out}:\n  stage 1 run     {run_dir}\n  injected model  {injected}\n"
        f"  fine-tune run   {out / 'finetune' / 'train'}\n  probe           {out / 'probe' / 'probe.json'}"
    )
    if not online:
        print("reminder: the teacher was random-init (offline); see the banner above.")
    return 0


def _pretrain(out: Path, imgsz: int, steps: int, online: bool) -> Path:
    """Stage 1 on the shapes' training images with the default teacher (random-init when offline)."""
    from backbone_kd.pretrain.config import build_config
    from backbone_kd.pretrain.loop import pretrain

    cfg = build_config(
        [],
        unlabeled=[str(out / "shapes" / "images" / "train")],
        output=str(out),
        name="pretrain",
        exist_ok=True,
        image_size=imgsz,
        batch_size=8,
        steps=steps,
        workers=0,
        log_every=5,
        save_every=0,
        warmup_steps=2,
        teacher="vit_small_patch14_dinov2.lvd142m",
        teacher_pretrained=online,
    )
    return pretrain(cfg)


def _finetune(model: Path, data_yaml: Path, project: Path, imgsz: int, epochs: int) -> None:
    """A short plain ultralytics fine-tune of the injected model (explicit AdamW: ``auto`` barely moves in 1 epoch)."""
    from backbone_kd.finetune import finetune

    finetune(
        str(model),
        data=str(data_yaml),
        epochs=epochs,
        imgsz=imgsz,
        batch=8,
        workers=0,
        device="cpu",
        project=str(project),
        name="train",
        exist_ok=True,
        plots=False,
        optimizer="AdamW",
        lr0=1e-3,
        nbs=8,
        verbose=False,
    )


def _probe(backbone: Path, data_yaml: Path, folder: Path) -> None:
    """``bkd probe`` of the distilled backbone vs a random one on the shapes' object crops (tiny: 64 px crops)."""
    from backbone_kd.probe.cli import run as probe

    probe(
        ["--backbones", "scratch=yolov8n.yaml", f"distilled={backbone}", "--data", str(data_yaml), "--imgsz", "64"]
        + ["--crop-min-size", "8", "--crop-min-train", "1", "--out", str(folder), "--json", str(folder / "probe.json")]
    )


if __name__ == "__main__":
    sys.exit(main())
