"""The Llama 2 parity harness: runs the reference and transformers side by side and judges them."""
