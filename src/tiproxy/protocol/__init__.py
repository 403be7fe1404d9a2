"""The MySQL wire protocol, sans-IO: bytes in, parsed facts out.

Nothing here imports asyncio, socket or ssl.
"""
