"""Grok-1 in pure JAX: config, params, checkpoint, model math, tokenizer and the single-process engine."""
