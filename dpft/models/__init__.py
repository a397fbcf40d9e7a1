"""dpft/models"""
