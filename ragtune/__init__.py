"""ragtune: fine-tune a RAG assistant's models and prove it with numbers."""

__version__ = "0.1.0"
