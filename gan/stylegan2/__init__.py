"""Class-conditional StyleGAN2 (Karras et al. 2020) in plain PyTorch: networks, losses, presets.

:mod:`gan.stylegan2.networks` builds the generator and discriminator from dataclass configs
(:mod:`gan.stylegan2.config`); :mod:`gan.stylegan2.loss` holds the losses and regularizers.
See docs/stylegan2.md.
"""
