"""Conversions of other libraries' layers, registered with ``actprune.register_conversion``.

``hf`` registers Hugging Face transformers' layers, ``timm`` timm's. actprune never imports either
library itself: ``prune_activations_`` imports the matching module here once the library has been
imported (a model from it exists), so a user's code needs nothing more than
``prune_activations_(model, config)``. Importing a module here directly works too.
"""
