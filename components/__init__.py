"""MixBCT backward-compatible upgrade: the plain library.

No Prefect, no tracking URIs, no seeds and no folder creation at import time: flows and the CLI do that.
Method: Liang et al., "MixBCT: Towards Self-Adapting Backward-Compatible Training", arXiv:2308.06948.
"""
