"""KD loss terms: finite, zero when student == teacher (where they should be), and they move the student toward it."""

from __future__ import annotations

import copy

import pytest
import torch
from ultralytics.cfg import get_cfg
from ultralytics.nn.tasks import DetectionModel

from backbone_kd.detkd import losses_feature as lf
from backbone_kd.detkd import losses_response as lr
from backbone_kd.detkd.adapters import FeatureAdapters, neck_widths
from backbone_kd.detkd.model import as_kd_model
from backbone_kd.detkd.recipe import ALL_LOSSES, load_recipe
from backbone_kd.detkd.teacher import KDLink, check_pair, head_dict

IMGSZ = 64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread while these tests run (restored after).

    On a small CPU shared with other jobs, every parallel op waits at an OpenMP barrier for a thread that may be
    descheduled: with 2 threads a test here measured 9-23 s, with 1 thread 2.5 s.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


_BUILT: dict[tuple[str, int, int], tuple[DetectionModel, torch.Tensor]] = {}


def _model(cfg: str, nc: int = 2, seed: int = 0) -> DetectionModel:
    """Seeded model; built once per (cfg, nc, seed) and deep-copied after (a build runs a stride-probing forward at
    256 px: seconds each on a busy CPU). The RNG state after the build is restored too, so whatever the test draws
    next (adapter init, batches) is the same as with a fresh build."""
    key = (cfg, nc, seed)
    if key not in _BUILT:
        torch.manual_seed(seed)
        model = DetectionModel(cfg, nc=nc, verbose=False)
        _BUILT[key] = (model, torch.get_rng_state())
    model, rng = _BUILT[key]
    torch.set_rng_state(rng)
    return copy.deepcopy(model)


def _batch(bs: int = 2) -> dict:
    torch.manual_seed(1)
    return {
        "img": torch.rand(bs, 3, IMGSZ, IMGSZ),
        "cls": torch.tensor([[0.0], [1.0], [1.0]]),
        "bboxes": torch.tensor([[0.3, 0.3, 0.3, 0.4], [0.7, 0.6, 0.4, 0.3], [0.5, 0.5, 0.5, 0.5]]),
        "batch_idx": torch.tensor([0.0, 0.0, 1.0]),
    }


def _setup(student: DetectionModel, teacher: DetectionModel, enabled: list[str], **extra):
    """Attach a KD link (teacher frozen, adapters built) to ``student`` like the trainer does; returns the link."""
    recipe = load_recipe({"warmup_epochs": 0.0, **extra}, enabled=enabled)
    student.args = get_cfg()  # hyperparameters (box/cls/dfl gains) the detection criterion reads
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    class_index = check_pair(student, teacher, recipe)
    kind = recipe["features"]["adapter"]
    adapters = FeatureAdapters(neck_widths(student), neck_widths(teacher), mgd="mgd" in enabled, kind=kind)
    link = KDLink(teacher, adapters, recipe, class_index=class_index)
    as_kd_model(student, link)
    student.train()
    return link


def _kd_items(student: DetectionModel, batch: dict) -> dict[str, torch.Tensor]:
    loss, items = student.loss(batch)
    assert torch.isfinite(loss).all()
    return {k: v for k, v in items.items() if k not in {"box_loss", "cls_loss", "dfl_loss"}}


def test_response_terms_zero_when_equal_positive_when_not():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    for fn in (lambda a, b: lr.cls_bce_kd(a, b, 2.0, 1.0), lambda a, b: lr.cls_kl_kd(a, b, 2.0)):
        assert fn(t, t).abs().max() < 1e-5
        assert (fn(s, t) > 0).all() and torch.isfinite(fn(s, t)).all()
    ds, dt = torch.randn(2, 5, 4 * 16), torch.randn(2, 5, 4 * 16)
    assert lr.dfl_kd(dt, dt, 16).abs().max() < 1e-5 and (lr.dfl_kd(ds, dt, 16) > 0).all()
    anchors = torch.rand(5, 2) * 8
    bs_, bt = lr.decode_boxes(ds, anchors, 16), lr.decode_boxes(dt, anchors, 16)
    for kind in ("ciou", "l1"):
        assert lr.box_kd(bt, bt, kind).abs().max() < 1e-5 and (lr.box_kd(bs_, bt, kind) > 0).all()
    w = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert lr.weighted_mean(torch.full((2, 5), 3.0), w).item() == pytest.approx(3.0)
    assert lr.weighted_mean(torch.ones(2, 5), torch.zeros(2, 5)).item() == 0.0  # no positives: zero, finite


def test_feature_terms_zero_when_equal_and_masks():
    torch.manual_seed(0)
    s, t = torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)
    mask = (torch.rand(2, 1, 4, 4) > 0.5).float()
    for fn in (lf.feat_cosine, lf.feat_l2, lambda a, b, m: lf.feat_at(a, b, "both", m)):
        assert fn(t, t, mask).abs() < 1e-5 and fn(s, t, mask) > 0
    assert lf.feat_cwd(t, t, 2.0).abs() < 1e-5 and lf.feat_cwd(s, t, 2.0) > 0
    gen = FeatureAdapters([8], [8], mgd=True).generators[0]
    assert torch.isfinite(lf.feat_mgd(s, t, gen, 0.5, mask))
    batch = {"bboxes": torch.tensor([[0.25, 0.25, 0.5, 0.5]]), "batch_idx": torch.tensor([1.0])}
    (m,) = lf.gt_masks(batch, [(4, 4)], 2)
    assert m[0].sum() == 0 and m[1, 0, :2, :2].sum() == 4 and m[1].sum() == 4  # top-left quadrant of image 1 only
    (tm,) = lf.teacher_masks(torch.zeros(2, 16, 3), [(4, 4)])
    assert torch.allclose(tm, torch.full((2, 1, 4, 4), 0.5))


def test_all_terms_zero_when_student_equals_teacher():
    student = _model("yolov8n.yaml")
    teacher = copy.deepcopy(student)
    _setup(student, teacher, list(ALL_LOSSES), **{"losses": {"pseudo": {"conf": 0.001}}})
    student.eval()  # BN in eval on both sides: identical outputs; KD still computed via distill flag below
    batch = _batch()
    preds = student(batch["img"])  # eval output (y, raw dict); the criterion reads the raw dict
    _, items = student.init_criterion()(preds, batch, distill=True)
    for name in ("kd_cls", "kd_dfl", "kd_box", "pl_kl", "f_cos", "f_l2", "f_cwd", "f_at"):
        assert abs(float(items[name])) < 1e-4, (name, float(items[name]))
    assert all(torch.isfinite(v) for v in items.values())
    assert float(items["f_mgd"]) > 0  # MGD must reconstruct dropped pixels even for identical maps


@pytest.mark.parametrize("term", ["cls", "dfl", "box", "pseudo", "cos", "l2", "cwd", "mgd", "at"])
def test_each_term_moves_student_toward_teacher(term):
    # cross-family and cross-width: YOLOv8s teacher (neck 128/256/512) -> YOLO11n student (64/128/256)
    student, teacher = _model("yolo11n.yaml", seed=0), _model("yolov8s.yaml", seed=1)
    extra = {"losses": {"pseudo": {"conf": 0.001}}, "det_weight": 0.0}
    link = _setup(student, teacher, [term], **extra)
    batch = _batch()
    params = [p for p in student.parameters() if p.requires_grad] + list(link.adapters.parameters())
    opt = torch.optim.Adam(params, lr=2e-3)

    def kd_value() -> torch.Tensor:
        torch.manual_seed(3)  # same MGD mask every evaluation
        return sum(_kd_items(student, batch).values())

    before = float(kd_value())
    for _ in range(8):
        torch.manual_seed(3)
        loss, _ = student.loss(batch)
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
    after = float(kd_value())
    assert before > 0 and after < before, (term, before, after)


def test_adapters_get_gradients_and_teacher_gets_none():
    student, teacher = _model("yolov8n.yaml", seed=0), _model("yolov8s.yaml", seed=1)
    link = _setup(student, teacher, ["cos", "cwd"])
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    loss, _ = student.loss(_batch())
    loss.sum().backward()
    grads = [p.grad for p in link.adapters.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, t_before[k]) for k, v in teacher.state_dict().items())  # BN stats untouched


def test_incompatible_pairs_are_refused():
    student = _model("yolov8n.yaml", nc=2)
    recipe = load_recipe()
    with pytest.raises(ValueError, match="classes"):
        check_pair(student, _model("yolov8n.yaml", nc=3), recipe)
    with pytest.raises(ValueError, match="strides"):
        check_pair(student, _model("yolov8n-p2.yaml", nc=2), recipe)


def test_eval_mode_reports_zero_kd_items():
    student, teacher = _model("yolov8n.yaml", seed=0), _model("yolov8n.yaml", seed=1)
    _setup(student, teacher, ["cls", "cwd"])
    student.eval()
    _, items = student.loss(_batch())
    assert float(items["kd_cls"]) == 0.0 and float(items["f_cwd"]) == 0.0 and float(items["cls_loss"]) > 0


def _swap_classes(model: DetectionModel) -> None:
    """Reverse the order of a 2-class v8/11 head's class outputs in place (weights and biases of cv3's last conv)."""
    with torch.no_grad():
        for branch in model.model[-1].cv3:
            conv = branch[-1]
            conv.weight.copy_(conv.weight.flip(0))
            conv.bias.copy_(conv.bias.flip(0))


def test_class_order_checked_and_class_map_permutes_teacher():
    """Same class count, other order: refused with both lists; class_map=auto (or a list) permutes the teacher."""
    student = _model("yolov8n.yaml")
    student.names = {0: "car", 1: "person"}
    teacher = copy.deepcopy(student)
    _swap_classes(teacher)
    teacher.names = {0: "person", 1: "car"}
    with pytest.raises(
        ValueError, match=r"teacher classes \['person', 'car'\].*student/data classes \['car', 'person'\]"
    ):
        check_pair(student, teacher, load_recipe())
    assert check_pair(student, teacher, load_recipe({"class_map": "auto"})) == [1, 0]
    assert check_pair(student, teacher, load_recipe({"class_map": ["car", "person"]})) == [1, 0]  # teacher names
    assert check_pair(student, teacher, load_recipe({"class_map": [1, 0]})) == [1, 0]
    assert check_pair(student, copy.deepcopy(student), load_recipe()) is None  # same order: nothing to permute
    for bad, match in (([0, 0], "twice"), ([0], "one entry per"), ([0, 5], "out of range"), (["bus", 0], "bus")):
        with pytest.raises(ValueError, match=match):
            check_pair(student, teacher, load_recipe({"class_map": bad}))
    for bad in (3.5, {"car": 0}, [True, False]):
        with pytest.raises(ValueError, match="class_map"):
            load_recipe({"class_map": bad})
    assert load_recipe({"class_map": "1,0"})["class_map"] == [1, 0]  # the command-line form
    assert load_recipe({"class_map": "car,person"})["class_map"] == ["car", "person"]

    # with the permutation, a teacher that is the student with swapped outputs is a perfect teacher: zero class KD
    _setup(student, teacher, ["cls"], class_map="auto")
    student.eval()
    batch = _batch()
    _, items = student.init_criterion()(student(batch["img"]), batch, distill=True)
    assert abs(float(items["kd_cls"])) < 1e-4


def test_dfl_refused_for_reg_max_1_heads():
    """YOLO26 heads regress boxes directly (reg_max=1): DFL KD would be identically zero, so it is refused."""
    student, teacher = _model("yolo26n.yaml", seed=0), _model("yolo26n.yaml", seed=1)
    assert student.model[-1].reg_max == 1
    with pytest.raises(ValueError, match="reg_max=1.*box"):
        check_pair(student, teacher, load_recipe(enabled="cls,dfl"))
    check_pair(student, teacher, load_recipe(enabled="cls,box"))


def _o2o_grads(student: DetectionModel) -> tuple[float, float]:
    head = student.model[-1]
    box = sum(float(p.grad.abs().sum()) for p in head.one2one_cv2.parameters() if p.grad is not None)
    cls = sum(float(p.grad.abs().sum()) for p in head.one2one_cv3.parameters() if p.grad is not None)
    return box, cls


@pytest.mark.parametrize("teacher_cfg", ["yolov10n.yaml", "yolov8n.yaml"])
def test_one2one_branch_of_end_to_end_student_is_distilled(teacher_cfg):
    """The one2one head (used at inference) gets KD gradients, not only one2many; detection loss is off (weight 0)."""
    student, teacher = _model("yolov10n.yaml", seed=0), _model(teacher_cfg, seed=1)
    _setup(student, teacher, ["cls", "dfl", "box"], det_weight=0.0)
    loss, items = student.loss(_batch())
    loss.sum().backward()
    box, cls = _o2o_grads(student)
    assert box > 0, "one2one box branch got no KD gradient"
    assert float(items["kd_cls"]) > 0 and float(items["kd_box"]) > 0
    if teacher_cfg == "yolov10n.yaml":  # end-to-end teacher: its own one2one scores teach the student's
        assert cls > 0, "one2one class branch got no KD gradient"
    else:  # dense teacher: its NMS-style scores would teach duplicates to an NMS-free branch
        assert cls == 0
    # recipe one2one=false (ablation): one2many only, as before
    student.zero_grad()
    student.kd_link.recipe["one2one"] = False
    student.loss(_batch())[0].sum().backward()
    assert _o2o_grads(student) == (0.0, 0.0)


def test_cwd_mask_refused_and_at_uses_raw_features():
    with pytest.raises(ValueError, match="cwd"):
        load_recipe({"losses": {"cwd": {"mask": "gt"}}}, enabled="cwd")
    student, teacher = _model("yolov8n.yaml", seed=0), _model("yolov8s.yaml", seed=1)  # widths differ
    _setup(student, teacher, ["at"], losses={"at": {"mode": "spatial"}})
    student.eval()
    batch = _batch()
    preds = student(batch["img"])
    _, items = student.init_criterion()(preds, batch, distill=True)
    t_feats = head_dict(teacher(batch["img"]))["feats"]
    expected = sum(lf.feat_at(s, t, "spatial").detach() for s, t in zip(head_dict(preds)["feats"], t_feats))
    assert float(items["f_at"]) == pytest.approx(float(expected), rel=1e-5)
    # spatial attention needs no adapter at all
    student.kd_link.adapters = None
    student.criterion = None
    _, items = student.init_criterion()(preds, batch, distill=True)
    assert float(items["f_at"]) == pytest.approx(float(expected), rel=1e-5)


def test_columns_follow_enabled_order():
    """kd=cwd,cls: each value lands in its own column whatever the order of enabled terms."""
    results = []
    for enabled in (["cwd", "cls"], ["cls", "cwd"]):
        student, teacher = _model("yolov8n.yaml", seed=0), _model("yolov8n.yaml", seed=1)
        _setup(student, teacher, enabled)
        student.eval()
        batch = _batch()
        _, items = student.init_criterion()(student(batch["img"]), batch, distill=True)
        results.append({k: float(items[k]) for k in ("kd_cls", "f_cwd")})
    assert results[0] == pytest.approx(results[1])
    assert results[0]["kd_cls"] != pytest.approx(results[0]["f_cwd"])


def test_builtin_l2_recipe_equals_ultralytics_distillation_loss():
    """recipe=builtin_l2 reproduces ultralytics' DistillationModel loss exactly (same projector weights)."""
    from ultralytics.nn.distill_model import DistillationModel

    student, teacher = _model("yolo26n.yaml", seed=0), _model("yolo26s.yaml", seed=1)  # end-to-end, widths differ
    recipe = load_recipe("builtin_l2")
    assert recipe["enabled"] == ["l2"] and recipe["features"]["adapter"] == "mlp"
    twin = copy.deepcopy(student)
    twin.args = get_cfg(overrides={"imgsz": IMGSZ})
    builtin = DistillationModel(teacher_model=copy.deepcopy(teacher), student_model=twin).train()
    link = _setup(student, teacher, ["l2"], **{k: v for k, v in recipe.items() if k != "enabled"})
    link.adapters.proj.load_state_dict(builtin.projector.state_dict())
    batch = _batch()
    _, ours = student.loss(batch)
    _, theirs = builtin.loss(batch)
    assert float(ours["f_l2"]) == pytest.approx(float(theirs["dis_loss"]), rel=1e-4)


def test_same_level_count_other_strides_refused():
    """A 3-level P2-P4 teacher (strides 4/8/16) does not pair with a P3-P5 student just because both have 3 levels."""
    from ultralytics.nn.tasks import yaml_model_load

    cfg = yaml_model_load("yolov8n-p2.yaml")  # scale "n" read from the name
    cfg["head"][-1][0] = cfg["head"][-1][0][:3]  # Detect(P2, P3, P4)
    torch.manual_seed(0)
    teacher = DetectionModel(cfg, nc=2, verbose=False)
    assert teacher.model[-1].stride.tolist() == [4.0, 8.0, 16.0]
    with pytest.raises(ValueError, match="strides"):
        check_pair(_model("yolov8n.yaml"), teacher, load_recipe())


def test_shipped_default_yaml_is_the_default_recipe():
    assert load_recipe("default") == load_recipe()
