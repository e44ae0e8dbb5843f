"""3D alpha-WGAN-GP (Kwon et al., MICCAI 2019): encoder, generator, discriminator and code
discriminator at 64^3, WGAN-GP on images and on codes, L1 reconstruction."""
