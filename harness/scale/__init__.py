"""Large models and where they diverge: capture, localisation, streaming, placement."""
