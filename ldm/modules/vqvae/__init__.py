"""vqvae."""
