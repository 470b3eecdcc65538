"""The torch engine: FSDP2 on the Hugging Face model."""
