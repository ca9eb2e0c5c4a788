"""Runnable examples (``python -m cpattn.examples.<name>``) and what they share with the tests and benchmarks:

* ``demo``: attention on random inputs, single device or context parallel under torchrun;
* ``train_transformers``: a tiny Hugging Face Llama trained with context-parallel attention;
* ``tiny_decoder``: a small RoPE/GQA decoder whose attention is a parameter (inference tests, bench_serving).
"""
