"""Domain harmonization: making images from one site look as if another site had taken them.

Every method here maps an image (float, [0, 1]) from a source domain towards a target domain
and is scored the same way against paired truth (:mod:`eval.paired`):

* :mod:`harmonize.histogram` -- histogram matching to a reference set (classical baseline);
* :mod:`harmonize.methods` -- every classical method behind one interface (fit on the target
  domain, save and load the fitted state, apply to source images) and a registry by name:
  histogram, lung-field histogram, percentile and z-score standardization, CLAHE, FDA;
* :mod:`harmonize.trees` -- a method applied to a whole dataset tree (``cxr harmonize``);
* learned translators (CycleGAN, :mod:`gan.cyclegan`) are applied to whole dataset trees with
  ``cxr translate``.
"""
