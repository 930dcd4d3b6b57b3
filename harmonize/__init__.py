"""Domain harmonization: making images from one site look as if another site had taken them.

Every method here maps an image (float, [0, 1]) from a source domain towards a target domain
and is scored the same way against paired truth (:mod:`eval.paired`):

* :mod:`harmonize.histogram` -- histogram matching to a reference set (classical baseline);
* learned translators (CycleGAN, :mod:`gan.cyclegan`) are applied to whole dataset trees with
  ``cxr translate``.

Later classical methods (e.g. ComBat-style intensity harmonization, CLAHE normalization)
gather here too, each as pure functions on arrays.
"""
