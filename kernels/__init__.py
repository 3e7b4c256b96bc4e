"""longtune attention kernels: mask predicates, backends, the "longtune" AttentionInterface entry.

Deliberately empty of code and of ``__version__``: transformers probes a top-level ``kernels``
package for the Hugging Face Hub ``kernels`` library (and may load this one while importing
itself), so this file must stay cheap and must not look like the Hub package
(tests/test_kernels_not_hub.py). Import the submodules: ``kernels.registry``, ``kernels.layout``,
``kernels.masks``, ``kernels.bench``.
"""
