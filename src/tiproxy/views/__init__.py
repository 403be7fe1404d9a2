"""What the proxy counts and shows of itself, shared by every part and depending on none of
them (only on the config and protocol packages beneath them all).

The data plane counts (`counters.py`) and keeps its recent moves (`history.py`); the API and
the metrics read the proxy through one read-only view (`interface.py`), which the control plane
implements. The planes, the workers' messages and the API import from here, never from each
other, so none of them imports another in a circle.
"""
