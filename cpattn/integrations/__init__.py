"""Integrations of cpattn with other libraries; each submodule imports its library only when used.

``cpattn.integrations.transformers``: Hugging Face transformers models on cpattn attention.
"""
