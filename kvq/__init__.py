"""kvq: experiments on KV-cache quantization of large language models."""

__version__ = "0.1.0"
