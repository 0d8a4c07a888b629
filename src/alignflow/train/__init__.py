"""Training core: pure loss / advantage / log-prob functions plus checkpointing helpers.

Import from the submodules directly (``alignflow.train.losses``, ``alignflow.train.advantages``,
``alignflow.train.logprobs``); this package file stays empty so importing one part never pulls in another.
"""
