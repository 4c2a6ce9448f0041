"""lookahead: lossless trie-drafted speculative decoding for RAG pipelines on stock Hugging Face transformers."""

__version__ = "0.1.0"
