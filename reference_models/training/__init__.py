"""The training harness of the reference models, split by concern.

* :mod:`~reference_models.training.config`: :class:`TrainConfig`, TOML presets, overrides;
* :mod:`~reference_models.training.components`: datasets, model and balancer, each from its
  slice of the configuration, wired by :mod:`reference_models.recipes`;
* :mod:`~reference_models.training.batches`: mini-batches and padding masks;
* :mod:`~reference_models.training.step`: one training step, one evaluation pass;
* :mod:`~reference_models.training.loop`: epochs, early stopping, resume;
* :mod:`~reference_models.training.checkpoint`: checkpoints and random state;
* :mod:`~reference_models.training.report`: log records, history, plots, summary.

The command line is ``python -m reference_models.train`` (``gradbalance-train``).
"""
