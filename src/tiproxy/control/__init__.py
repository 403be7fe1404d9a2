"""The control plane: the backends as the proxy knows them, and the proxy seen from outside."""
