# Copyright (c) radfm3d contributors. Apache-2.0.
"""Training/evaluation glue for MONAI engines (``SupervisedTrainer`` / ``SupervisedEvaluator``).

- :mod:`.data`: manifest -> dataset -> loader (seeded, resumable, distributed sampler; collates)
- :mod:`.prepare`: ``PrepareBatchVLM`` (token ids, masks, images -> engine inputs)
- :mod:`.loss`: ``CausalLMLoss``
- :mod:`.inferer`: ``ForwardInferer`` (bf16 autocast), ``GenerationInferer``
- :mod:`.handlers`: ``TrainingCheckpointer`` (atomic, exact resume), ``TimeLimit``, ``PredictionWriter``,
  ``EvaluationReportHandler``, ``ProgressBar``
- :mod:`.training`: stages (alignment / instruction with LoRA), freeze switches, optimizer, warm-up + cosine LR

Stage 0 (vision pre-training on structured labels) lives with the findings reader: :mod:`radfm3d.findings.pretraining`.
"""

from __future__ import annotations

from radfm3d.utils import lazy_exports

_EXPORTS: dict[str, str] = {
    "PrepareBatchVLM": "radfm3d.engine.prepare",
    "CausalLMLoss": "radfm3d.engine.loss",
    "ForwardInferer": "radfm3d.engine.inferer",
    "GenerationInferer": "radfm3d.engine.inferer",
    "TrainingCheckpointer": "radfm3d.engine.handlers",
    "TimeLimit": "radfm3d.engine.handlers",
    "PredictionWriter": "radfm3d.engine.handlers",
    "EvaluationReportHandler": "radfm3d.engine.handlers",
    "ProgressBar": "radfm3d.engine.handlers",
    "ResumableSampler": "radfm3d.engine.data",
    "build_dataset": "radfm3d.engine.data",
    "build_dataloader": "radfm3d.engine.data",
    "TrainingCollate": "radfm3d.engine.data",
    "PromptCollate": "radfm3d.engine.data",
    "configure_stage": "radfm3d.engine.training",
    "build_model": "radfm3d.engine.training",
    "build_optimizer": "radfm3d.engine.training",
    "warmup_cosine_schedule": "radfm3d.engine.training",
    "save_trained_model": "radfm3d.engine.training",
    "load_trained_model": "radfm3d.engine.training",
    "load_processor": "radfm3d.engine.training",
    "seed_everything": "radfm3d.engine.training",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports("radfm3d.engine", _EXPORTS)
