"""proxy/takeover.py reads two private attributes of aiohttp; this fails loudly when a release moves them."""
import asyncio

from aiohttp.client_proto import ResponseHandler
from aiohttp.web_protocol import RequestHandler


def test_server_protocol_keeps_the_bytes_after_an_upgrade_head_in_message_tail():
    assert "_message_tail" in RequestHandler.__slots__


async def test_client_protocol_keeps_the_bytes_after_a_101_in_tail():
    proto = ResponseHandler(asyncio.get_running_loop())
    assert proto._tail == b""
    assert callable(proto._drop_timeout)
    assert proto.upgraded is False
