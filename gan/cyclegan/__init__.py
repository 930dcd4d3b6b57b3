"""CycleGAN (Zhu et al. 2017) between two chest X-ray dataset trees.

:mod:`~gan.cyclegan.config` the run config (paper defaults), :mod:`~gan.cyclegan.data` the two
domains (training splits, preprocessed, in memory), :mod:`~gan.cyclegan.loss` the objective,
:mod:`~gan.cyclegan.trainer` the training loop, :mod:`~gan.cyclegan.translate` applying a
generator to a whole tree. Command line: ``cxr train-gan cyclegan`` and ``cxr translate``.
"""
