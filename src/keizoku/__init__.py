"""keizoku (継続, "continuation"): continual pre-training of Hugging Face LLMs."""

__version__ = "0.1.0"
