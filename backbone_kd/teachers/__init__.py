"""Frozen teachers, shared by stage 1 and the probes' teacher-ceiling rows.

``build_teacher`` (:mod:`.frozen`) turns a spec into a frozen module behind the feature contract
(:mod:`backbone_kd.features`): timm ViTs (DINOv2, DINOv3, plain), timm CNNs, YOLO backbones (``yolo:<path.pt>``) and
transformers-layout DINO checkpoints (:mod:`.hf_teacher`). Weights files are read as data (:mod:`.weights`,
:mod:`backbone_kd.safe_load`).
"""
