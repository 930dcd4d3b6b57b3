"""CUT and FastCUT (Park et al. 2020): unpaired translation with one generator and PatchNCE.

:mod:`~gan.cut.config` the run config (paper defaults; data and optimizer sections shared
with the CycleGAN), :mod:`~gan.cut.nce` the PatchNCE loss and its MLP heads (pure),
:mod:`~gan.cut.trainer` the family on the engine's loop and :func:`~gan.cut.trainer.train_cut`,
the library entry point. A run translates trees with :mod:`gan.cyclegan.translate` (its
generator is checkpointed as ``G_ab``). Command line: ``cxr train-gan cut``, ``cxr harmonize
--method cut|fastcut``.
"""
