"""Image loading shared by stage 1 and the probes: 8-bit RGB, EXIF orientation, decompression-bomb guard.

Both the unlabeled pretraining data (:mod:`backbone_kd.pretrain.data`) and the probes (:mod:`backbone_kd.probe`) read
images through :func:`load_rgb`, so an image means the same pixels to the trainer and to the instruments judging it.
"""

from __future__ import annotations

import sys

import numpy as np
from PIL import Image, ImageOps

# PIL's own decompression-bomb threshold: larger images are refused before their pixels are decoded.
DEFAULT_MAX_PIXELS = 89_478_485


def _pil_open():
    """PIL's own ``Image.open``, even after ultralytics replaced it.

    ultralytics swaps ``Image.open`` for a wrapper that runs a pip install of pi-heif the first time a file cannot be
    identified; in an unlabeled set a corrupt file must simply be skipped, never trigger an install.
    """
    opener = Image.open
    module = getattr(opener, "__module__", "") or ""
    if module.startswith("ultralytics"):
        opener = getattr(sys.modules.get(module), "_image_open", opener)
    return opener


def load_rgb(path: str, max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
    """Open an image as 8-bit RGB with EXIF orientation applied.

    Args:
        path: Image file.
        max_pixels: Images with more pixels are refused from their header, before decoding.
        draft_size: For JPEGs, let libjpeg decode at a reduced scale whose shorter side is still >= this.

    Raises:
        ValueError: Oversized image. OSError / PIL errors propagate for unreadable files.
    """
    with _pil_open()(path) as im:
        w, h = im.size
        if w * h > max_pixels:
            raise ValueError(f"{w}x{h} exceeds max_image_pixels={max_pixels} (decompression-bomb guard)")
        if draft_size and im.format == "JPEG":
            scale = min(w, h) / draft_size
            if scale >= 2:
                im.draft("RGB", (int(w / scale) + 1, int(h / scale) + 1))
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16/32-bit grayscale: rescale to 8 bit by the actual range instead of clipping at 255.
            arr = np.asarray(im, dtype=np.float32)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / max(hi - lo, 1e-6) * 255.0
            im = Image.fromarray(arr.astype(np.uint8))
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            rgba = im.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (114, 114, 114, 255))  # ultralytics' letterbox grey
            im = Image.alpha_composite(background, rgba)
        return im.convert("RGB")
