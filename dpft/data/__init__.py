"""dpft/data"""
