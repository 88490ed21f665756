"""vlm: run LLaVA-style vision-language models locally."""

__version__ = "0.1.0"
