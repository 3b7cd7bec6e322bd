"""Fine-tuning (LP->FT): reload the network behind a probe, start the head from the probe, train.

- :mod:`~embedcache.experiments.finetune.config`: the frozen :class:`FinetuneConfig`.
- :mod:`~embedcache.experiments.finetune.setup`: the probe's backbone rebuilt, the data split like
  the probe's, the run key.
- :mod:`~embedcache.experiments.finetune.unfreeze`: which blocks train; the model summary.
- :mod:`~embedcache.experiments.finetune.augment`: train-time augmentation.
- :mod:`~embedcache.experiments.finetune.train`: the model, optimiser, schedule and epoch loop.
- :mod:`~embedcache.experiments.finetune.run`: :func:`finetune`, checkpoints, resume, export.
"""
