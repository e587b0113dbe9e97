"""rsitr_train: the training application of rsitr.

Retrieval training (:mod:`~rsitr_train.trainer`, run directories in :mod:`~rsitr_train.runs`,
end-to-end backbone training in :mod:`~rsitr_train.end_to_end`), scene-classification
pretraining of backbones (:mod:`~rsitr_train.pretrain`, :mod:`~rsitr_train.augment`), the epoch
skeleton both share (:mod:`~rsitr_train.loop`), model comparisons and ablation studies
(:mod:`~rsitr_train.experiments`), the demo, plots and the timing helpers of the benchmark
scripts (:mod:`~rsitr_train.profiling`). Run recipes and studies ship in ``configs/``.

It imports the library (:mod:`rsitr`); the library never imports it.
"""
