"""The model side of the posterior.

LLM wrappers that return selected logits or answer scores, which weights form LoRA blocks
and which of them are Bayesian, posterior adapters.
"""
