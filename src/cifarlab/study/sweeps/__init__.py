"""Sweeps: families of ordinary training runs whose summaries become a results/ table + plot."""
