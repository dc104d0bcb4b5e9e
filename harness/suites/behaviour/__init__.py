"""Behaviour beyond one forward pass: generation, KV cache, padding, classification, hidden states."""
