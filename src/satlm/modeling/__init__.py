"""The only place that knows Hugging Face module layouts."""
