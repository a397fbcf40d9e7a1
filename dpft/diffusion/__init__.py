"""dpft/diffusion"""
