"""3D-StyleGAN (Hong et al. 2021) and 3D Split&Shuffle-GAN (Liu et al. 2022): style-based 3D
networks with Channel Split&Shuffle convolutions, 2D -> 3D weight inflation, projection and
style mixing."""

from model.stylegan3d.config import FAMILIES, VARIANTS, StyleGAN3DConfig

__all__ = ["FAMILIES", "VARIANTS", "StyleGAN3DConfig"]
