"""Quality probes for backbones: does a (distilled) backbone give better features than another, before fine-tuning?

``bkd probe`` extracts frozen, pooled P3/P4/P5 features once per backbone and runs cheap probes on them: cosine k-NN
(k=10, 20) and a linear classifier on a labelled image folder (:mod:`.classify`), per-location linear probes on the
maps with labels from a YOLO dataset's boxes (:mod:`.dense`), and optionally the frozen-backbone detection probe
(:mod:`.detection`: neck + head trained, several seeds). Modules: ``backbones`` (SPEC -> frozen backbone),
``special_specs`` (``bn:`` and ``teacher:`` SPECs), ``folder`` (labelled folders; crops cut from a YOLO dataset),
``yolo_data`` (YOLO dataset splits and a cache-safe mirror), ``extract`` (features), ``classify``, ``dense``,
``dense_labels``, ``dense_fit``, ``stats`` (metrics, bootstrap intervals), ``detection``, ``cli``.
"""

from __future__ import annotations
