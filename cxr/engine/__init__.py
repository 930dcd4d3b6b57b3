"""Shared run infrastructure used by every trainer (CycleGAN, StyleGAN2, classifiers).

One small module per concern, imported directly (``from cxr.engine.checkpoint import
CheckpointManager``) so that importing one piece never pulls in TensorBoard or kornia:

- :mod:`~cxr.engine.config`: dataclass configs from YAML plus ``key=value`` overrides.
- :mod:`~cxr.engine.cli`: the common ``--config/--run-dir/--resume/--dry-run`` arguments.
- :mod:`~cxr.engine.rundir`: numbered run folders, ``config.yaml`` and ``run.json``.
- :mod:`~cxr.engine.checkpoint`: atomic safetensors checkpoints, keep-last-k and best.
- :mod:`~cxr.engine.logging`: ``stats.jsonl``, TensorBoard, ``summary.csv``, ``log.txt``.
- :mod:`~cxr.engine.distributed`: torchrun/DDP setup (nccl on GPU, gloo on CPU).
- :mod:`~cxr.engine.guards`: NaN/Inf guard, graceful SIGINT, out-of-memory messages.
- :mod:`~cxr.engine.seed`: seeding and capturing/restoring every RNG.
- :mod:`~cxr.engine.speed`: bf16 autocast, ``torch.compile``, fused Adam, channels_last.
- :mod:`~cxr.engine.data`: a resumable infinite batch stream and kornia GPU augmentation.
"""
