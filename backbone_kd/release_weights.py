"""Ultralytics release names (``yolov8n.pt``) resolve the way ``YOLO("yolov8n.pt")`` resolves them.

Wherever backbone_kd takes a ``.pt`` (``--into``, ``--student``, ``--teacher yolo:``, ``bkd probe --backbones``,
``bkd compare``, ``distill-detect teacher=``, ``distill-classify teacher=``), :func:`resolve_pt` turns the argument into
a file: an existing path is used as is; a bare name that is one of ultralytics' release assets
(``ultralytics.utils.downloads.GITHUB_ASSETS_NAMES``) is taken from ultralytics' weights folder, or fetched there with
ultralytics' own asset download (never overwriting a file); any other name stays "not found". The file is then read
as data like any other (``backbone_kd.safe_load``): a download is no more trusted than a local file.

Offline (``YOLO_OFFLINE=1``, or a 2 s connection probe finds no route to github.com) the error comes within seconds and
says where to put the file.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
ASSET_HOST = "github.com"


def host_reachable(host: str, timeout: float = 2.0) -> bool:
    """Fast check (DNS + TCP connect to port 443). Behind an HTTPS proxy a direct connection proves nothing, so the
    host counts as reachable there."""
    if any(os.environ.get(var) for var in PROXY_VARIABLES):
        return True
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def release_name(name: str) -> str | None:
    """The ultralytics asset a bare ``name`` refers to (``yolov5n.pt`` -> ``yolov5nu.pt``, as ultralytics maps it),
    or None when ``name`` is a path or not a release asset."""
    from ultralytics.utils.checks import check_yolov5u_filename
    from ultralytics.utils.downloads import GITHUB_ASSETS_NAMES

    if Path(name).name != name or not name.endswith(".pt"):
        return None
    asset = check_yolov5u_filename(name, verbose=False)
    return asset if asset in GITHUB_ASSETS_NAMES else None


def weights_dir() -> Path:
    """ultralytics' weights folder (``yolo settings weights_dir=...``)."""
    from ultralytics.utils import SETTINGS

    return Path(SETTINGS["weights_dir"])


def _download(asset: str, target: Path) -> None:
    """ultralytics' own release download (retries, size check, progress bar) into ``target``."""
    from ultralytics.utils.downloads import attempt_download_asset

    target.parent.mkdir(parents=True, exist_ok=True)
    attempt_download_asset(str(target))


def _offline() -> bool:
    return os.environ.get("YOLO_OFFLINE", "").lower() in ("1", "true", "yes") or not host_reachable(ASSET_HOST)


def resolve_pt(spec: str | Path, what: str = "checkpoint") -> Path:
    """The file a ``.pt`` argument names, fetching an ultralytics release asset when needed.

    Args:
        spec: A path, or a bare release name such as ``yolov8n.pt`` / ``yolo11s-seg.pt``.
        what: What the argument is, for the error message (``--into``, ``teacher``...).

    Returns:
        An existing file: ``spec`` itself, the working folder's or ultralytics' weights folder's copy, or the download.

    Raises:
        FileNotFoundError: not a file and not a release name; or a release name that cannot be downloaded here (one
            line saying where to put the file).
    """
    path = Path(spec)
    if path.is_file():
        return path
    asset = release_name(str(spec))
    if asset is None:
        raise FileNotFoundError(f"{what} {spec} not found; pass an existing .pt file or an ultralytics release name "
                                "such as yolov8n.pt")  # fmt: skip
    for candidate in (Path(asset), weights_dir() / asset):  # where YOLO("yolov8n.pt") looks, in its order
        if candidate.is_file():
            return candidate
    target = weights_dir() / asset
    if _offline():
        raise FileNotFoundError(
            f"{what} {spec} is an ultralytics release file but {ASSET_HOST} cannot be reached to download it; "
            f"download {asset} elsewhere and put it at {target} (or in the working folder), or pass its path"
        )
    _download(asset, target)
    if not target.is_file():
        raise FileNotFoundError(f"downloading {asset} into {target} failed; download it by hand and pass its path")
    return target
