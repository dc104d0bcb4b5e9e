"""lm-eval benchmark scores of the reference and transformers, compared per document."""
