"""Training data: prompt lists and real images (with a cache of their VAE latents)."""
