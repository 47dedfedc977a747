"""Training / evaluation machinery used by ``train.py`` and ``eval.py``.

- ``distributed``: process groups (torchrun or ``--gpus N`` spawning), loss reduction, object gathering;
- ``lr_schedule``: linear warmup + epoch steps (paper Sec. 4.1);
- ``metric_logger``: smoothed values, ETA, JSON-lines log, PIL loss plot;
- ``checkpoint``: atomic checkpoint writes, loads with clear errors, model-identity check;
- ``trainer``: the training loop; ``evaluator_loop``: sharded inference + evaluation;
- ``builders``: datasets and data loaders from command-line settings.
"""
