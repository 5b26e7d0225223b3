"""Release names (``yolov8n.pt``) resolve like ``YOLO("yolov8n.pt")``: the download is patched (no network), then the
file is read as data like any other; offline, a one-line error says where to put the file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from backbone_kd import release_weights
from backbone_kd.release_weights import release_name, resolve_pt
from backbone_kd.safe_load import UnsafeCheckpointError
from tests.attack_files import exec_payload


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    """A clean yolov8n / yolo11n-cls checkpoint standing in for the release assets, and a backbone file."""
    from ultralytics import YOLO

    from backbone_kd.backbone_file import write_backbone_file

    root = tmp_path_factory.mktemp("release")
    torch.manual_seed(0)
    det = YOLO("yolov8n.yaml")
    det.save(root / "yolov8n.pt")
    YOLO("yolo11n-cls.yaml").save(root / "yolo11n-cls.pt")
    exec_payload(root / "yolov8n.pt", root / "pwned", root / "evil.pt")
    return {"root": root, "backbone": write_backbone_file(det, root / "backbone.safetensors")}


@pytest.fixture
def hub(monkeypatch, tmp_path, release_files):
    """ultralytics' weights folder in tmp_path, the network reachable, and a download that copies the stand-ins."""
    weights = tmp_path / "ul_weights"
    monkeypatch.setattr(release_weights, "weights_dir", lambda: weights)
    monkeypatch.setattr(release_weights, "host_reachable", lambda host, timeout=2.0: True)
    monkeypatch.delenv("YOLO_OFFLINE", raising=False)
    monkeypatch.chdir(tmp_path)
    calls: list[str] = []

    def download(asset: str, target: Path) -> None:
        calls.append(asset)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((release_files["root"] / asset).read_bytes())

    monkeypatch.setattr(release_weights, "_download", download)
    return {"weights": weights, "calls": calls}


def test_names_that_are_release_assets():
    assert release_name("yolov8n.pt") == "yolov8n.pt" and release_name("yolo11s-seg.pt") == "yolo11s-seg.pt"
    assert release_name("yolov5n.pt") == "yolov5nu.pt"  # ultralytics' own mapping
    assert release_name("my_model.pt") is None and release_name("dir/yolov8n.pt") is None
    assert release_name("yolov8n.yaml") is None


def test_download_into_the_weights_folder_once(hub):
    path = resolve_pt("yolov8n.pt")
    assert path == hub["weights"] / "yolov8n.pt" and path.is_file() and hub["calls"] == ["yolov8n.pt"]
    assert resolve_pt("yolov8n.pt") == path and hub["calls"] == ["yolov8n.pt"]  # found, never fetched again
    Path("yolov8n.pt").write_bytes(path.read_bytes())
    assert resolve_pt("yolov8n.pt") == Path("yolov8n.pt")  # the working folder first, as ultralytics looks


def test_other_missing_names_stay_not_found(hub):
    with pytest.raises(FileNotFoundError, match="my_model.pt not found"):
        resolve_pt("my_model.pt")
    with pytest.raises(FileNotFoundError, match="not found"):
        resolve_pt("sub/yolov8n.pt")  # a path, not a release name: never downloaded
    assert hub["calls"] == []


@pytest.mark.parametrize("how", ["env", "probe"])
def test_offline_is_a_fast_one_line_error(monkeypatch, tmp_path, how):
    monkeypatch.setattr(release_weights, "weights_dir", lambda: tmp_path / "w")
    monkeypatch.chdir(tmp_path)
    if how == "env":
        monkeypatch.setenv("YOLO_OFFLINE", "1")
    else:
        monkeypatch.delenv("YOLO_OFFLINE", raising=False)
        monkeypatch.setattr(release_weights, "host_reachable", lambda host, timeout=2.0: False)
    monkeypatch.setattr(release_weights, "_download", lambda *a: pytest.fail("no download offline"))
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match=r"cannot be reached.*put it at .*w/yolov8n\.pt") as err:
        resolve_pt("yolov8n.pt", "--into")
    assert time.monotonic() - start < 5 and "\n" not in str(err.value)


def test_a_downloaded_file_is_read_as_data_too(hub, release_files, monkeypatch):
    from backbone_kd.safe_load import load_yolo_checkpoint

    evil = (release_files["root"] / "evil.pt").read_bytes()
    monkeypatch.setattr(release_weights, "_download", lambda asset, target: target.write_bytes(evil) and None)
    hub["weights"].mkdir(parents=True, exist_ok=True)
    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        load_yolo_checkpoint("yolov8n.pt")
    assert not (release_files["root"] / "pwned").exists()


def test_every_pt_argument_takes_a_release_name(hub, release_files, tmp_path, capsys):
    from backbone_kd.clskd.config import ClsKDConfig
    from backbone_kd.clskd.teacher import load_teacher as load_cls_teacher
    from backbone_kd.compare import compare
    from backbone_kd.detkd.teacher import load_teacher
    from backbone_kd.inject import main as inject_main
    from backbone_kd.probe.backbones import load_backbone
    from backbone_kd.teachers.frozen import build_teacher
    from backbone_kd.yolo_backbone import load_yolo_model

    out = tmp_path / "out.pt"
    assert inject_main(["--weights", str(release_files["backbone"]), "--into", "yolov8n.pt", "--out", str(out)]) == 0
    assert out.is_file()
    assert load_yolo_model("yolov8n.pt").yaml["yaml_file"] == "yolov8n.yaml"
    assert load_backbone("yolov8n.pt").strides == [8, 16, 32]  # bkd probe --backbones coco=yolov8n.pt
    assert build_teacher("yolo:yolov8n.pt").strides == [8, 16, 32]
    assert load_teacher("yolov8n.pt").model[-1].nc == 80
    teacher = load_cls_teacher(ClsKDConfig(teacher="yolo11n-cls.pt"), {i: str(i) for i in range(1000)}, "cpu")
    assert teacher.model.model[-1].linear.out_features == 1000
    with pytest.raises(ValueError, match="pass --data"):  # resolved (downloaded), then asks for --data as for a file
        compare(["yolov8n.pt"], out=tmp_path / "cmp")
    assert sorted(set(hub["calls"])) == ["yolo11n-cls.pt", "yolov8n.pt"]
