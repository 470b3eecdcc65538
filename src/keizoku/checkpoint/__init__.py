"""Hugging Face import/export."""
