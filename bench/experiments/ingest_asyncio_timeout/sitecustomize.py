# Experiment only, not product code: IngestServer._next_line with asyncio.timeout instead of asyncio.wait_for.
import asyncio
try:
    from forwarder import ingest
except Exception:
    ingest = None
if ingest is not None:
    async def _next_line(self, reader, buffer):
        scanned = 0
        while (end := buffer.find(b"\n", scanned)) < 0:
            scanned = len(buffer)
            if scanned > self.max_message_bytes:
                break
            async with asyncio.timeout(self.idle_timeout):
                chunk = await reader.read(ingest._READ_CHUNK)
            if not chunk:
                return None
            buffer += chunk
        if end < 0 or end > self.max_message_bytes:
            raise ingest.MessageTooLarge("request line exceeds max_message_bytes; closing the connection")
        line = bytes(buffer[:end])
        del buffer[:end + 1]
        return line
    ingest.IngestServer._next_line = _next_line
