"""The paper's analysis figures as code (``analyze.py`` is the command line), one file per figure:

- :mod:`~libra.analysis.neg_iou`: Fig. 3, IoU distribution of random, IoU-balanced and hard negatives (Sec. 3.1);
- :mod:`~libra.analysis.samples`: Fig. 6, training samples of random vs IoU-balanced sampling on images;
- :mod:`~libra.analysis.bfp`: Fig. 4, per-level feature magnitude before / after the balanced feature pyramid (Sec. 3.2);
- :mod:`~libra.analysis.loss_curves`: Fig. 5, balanced L1 / LGR-L1 vs smooth L1 and LGR-CE vs CE, by autograd (Sec. 3.3);
- :mod:`~libra.analysis.error_analysis`: Fig. 8, COCO-style error analysis (C75, C50, Loc, Sim, Oth, BG, FN; Sec. 4.1.5);
- :mod:`~libra.analysis.training_curves`: losses, lr and AP from a run's ``log.jsonl``;
- :mod:`~libra.analysis.tensorboard`: optional TensorBoard scalars next to ``log.jsonl`` (``train.py --tensorboard``).

Shared pieces: :mod:`~libra.analysis.sampling` (the R-CNN stage's candidates and samplers of one
image) and :mod:`~libra.analysis._io` (atomic PNG / JSON writes). Nothing here runs inside the
training step; the modules are imported only by ``analyze.py``, the tests and the trainer's plot.
Every figure is written as ``NAME.png`` with its data as ``NAME.json`` beside it.
"""
