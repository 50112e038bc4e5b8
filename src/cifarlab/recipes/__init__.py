"""Recipes: one config dataclass + presets per torch model, trained by cifarlab.train."""
