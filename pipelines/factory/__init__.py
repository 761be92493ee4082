"""The federated data factory: a conditional StyleGAN2-style generator (pure PyTorch), its domain key, slices and training."""
