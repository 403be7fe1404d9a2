"""The MySQL wire protocol, sans-IO: bytes in, parsed facts out. Never imports asyncio, socket or ssl."""
