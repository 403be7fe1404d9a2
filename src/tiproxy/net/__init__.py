"""The asyncio drivers: the only I/O on the data path."""
