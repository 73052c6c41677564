"""Loading models (HF dirs, hub ids, GGUF, aliases) and the architecture map."""
