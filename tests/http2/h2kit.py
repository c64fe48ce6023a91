"""HTTP/2 peers for tests, written with the `h2` package (a real HTTP/2 implementation, not ours):

    H2Upstream   a scriptable h2c server: echoes the request body with trailers; announces a
                 SETTINGS_MAX_CONCURRENT_STREAMS, may GOAWAY, counts connections and peak streams
    H2App        an h2c client over a raw socket: requests, and raw frames for hostile-input tests
"""
from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.events
import h2.settings

from harness import free_port


class H2Upstream:
    def __init__(self, *, max_streams: int = 100, hold: float = 0.0, goaway_at: int | None = None,
                 drain_at: int | None = None, trailers: bool = True) -> None:
        self.port = free_port()
        # False: a small answer leaves as nginx sends one, HEADERS and DATA with END_STREAM in one write
        self.trailers = trailers
        self.max_streams = max_streams
        self.hold = hold                      # seconds each answer waits (to keep streams concurrent)
        self.goaway_at = goaway_at            # on this request number (once): GOAWAY, that stream unprocessed
        # on this request number (once): a graceful GOAWAY that keeps that stream, which is then answered
        # (a server shutting down as Go's or nginx's do; `h2` itself would close, hence the state reset)
        self.drain_at = drain_at
        self._seen = 0
        self.connections = 0
        self.requests: list[dict] = []
        self.active = 0
        self.peak = 0
        self.pings = 0
        self.resets = 0
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "H2Upstream":
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._tasks):
                task.cancel()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self.max_streams})
        conn.initiate_connection()
        writer.write(conn.data_to_send())
        streams: dict[int, dict] = {}
        gone_away = False
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        self._seen += 1
                        if self.goaway_at is not None and self._seen == self.goaway_at:
                            gone_away = True   # this stream and later ones: never processed
                            conn.close_connection(last_stream_id=event.stream_id - 2)
                            continue
                        if gone_away:
                            continue
                        if self.drain_at is not None and self._seen == self.drain_at:
                            conn.close_connection(last_stream_id=event.stream_id)
                            conn.state_machine.state = h2.connection.ConnectionState.SERVER_OPEN
                        streams[event.stream_id] = {"headers": dict(event.headers), "body": b""}
                        self.active += 1
                        self.peak = max(self.peak, self.active)
                    elif isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                        if event.stream_id in streams:
                            streams[event.stream_id]["body"] += event.data
                    elif isinstance(event, h2.events.StreamEnded) and event.stream_id in streams:
                        task = asyncio.get_running_loop().create_task(
                            self._answer(conn, writer, event.stream_id, streams.pop(event.stream_id)))
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
                    elif isinstance(event, h2.events.StreamReset):
                        self.resets += 1
                        if streams.pop(event.stream_id, None) is not None:
                            self.active -= 1
                    elif isinstance(event, h2.events.PingReceived):
                        self.pings += 1
                writer.write(conn.data_to_send())
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            writer.close()

    async def _answer(self, conn, writer, sid: int, req: dict) -> None:
        try:
            if self.hold:
                await asyncio.sleep(self.hold)
            self.requests.append(req)
            body = req["body"]
            conn.send_headers(sid, [(":status", "200"), ("x-path", req["headers"].get(":path", "")),
                                    ("x-method", req["headers"].get(":method", ""))])
            if not self.trailers:
                conn.send_data(sid, body, end_stream=True)
                writer.write(conn.data_to_send())
                return
            offset = 0
            while offset < len(body):
                window = conn.local_flow_control_window(sid)
                if window <= 0:
                    writer.write(conn.data_to_send())
                    await asyncio.sleep(0.005)
                    continue
                size = min(window, conn.max_outbound_frame_size, len(body) - offset)
                conn.send_data(sid, body[offset:offset + size])
                offset += size
                writer.write(conn.data_to_send())
                await writer.drain()
            conn.send_headers(sid, [("x-trailer", "yes"), ("x-length", str(len(body)))], end_stream=True)
            writer.write(conn.data_to_send())
        except Exception:  # noqa: BLE001 - the stream was reset by the sidecar: fine for a test server
            pass
        finally:
            self.active -= 1


class H2App:
    """An HTTP/2 client with prior knowledge, on one connection; `conn` is open for raw frames."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.events: list = []
        self.streams: dict[int, dict] = {}
        self.closed = asyncio.Event()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> "H2App":
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.conn.initiate_connection()
        self.flush()
        self._task = asyncio.get_running_loop().create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        self._task.cancel()
        self._writer.close()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self._writer.is_closing():
            self._writer.write(data)

    def send_raw(self, data: bytes) -> None:
        self._writer.write(data)

    async def _read(self) -> None:
        try:
            while True:
                data = await self._reader.read(65536)
                if not data:
                    break
                try:
                    events = self.conn.receive_data(data)
                except Exception as exc:  # noqa: BLE001 - a hostile test may confuse our own state
                    self.events.append(exc)
                    break
                for event in events:
                    self.events.append(event)
                    sid = getattr(event, "stream_id", None)
                    st = self.streams.setdefault(sid, {"headers": None, "body": b"", "trailers": None,
                                                       "ended": False, "reset": None}) if sid else None
                    if isinstance(event, h2.events.ResponseReceived):
                        st["headers"] = dict(event.headers)
                    elif isinstance(event, h2.events.DataReceived):
                        st["body"] += event.data
                        self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
                    elif isinstance(event, h2.events.TrailersReceived):
                        st["trailers"] = dict(event.headers)
                    elif isinstance(event, h2.events.StreamEnded):
                        st["ended"] = True
                    elif isinstance(event, h2.events.StreamReset):
                        st["reset"] = event.error_code
                self.flush()
                self._changed.set()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.closed.set()
            self._changed.set()

    async def wait_for(self, predicate, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                if self.closed.is_set() and not predicate():
                    raise AssertionError("connection closed before the expected event")
                self._changed.clear()
                await self._changed.wait()

    def goaway(self):
        return next((e for e in self.events if isinstance(e, h2.events.ConnectionTerminated)), None)

    async def request(self, method: str, path: str, body: bytes = b"", headers=()) -> dict:
        sid = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, [(":method", method), (":scheme", "http"), (":authority", "app.local"),
                                     (":path", path), *headers], end_stream=not body)
        self.flush()
        offset = 0
        while offset < len(body):
            window = min(self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size)
            if window <= 0:
                self._changed.clear()
                await asyncio.wait_for(self._changed.wait(), 10)
                continue
            chunk = body[offset:offset + window]
            offset += len(chunk)
            self.conn.send_data(sid, chunk, end_stream=offset >= len(body))
            self.flush()
        await self.wait_for(lambda: self.streams.get(sid, {}).get("ended") or self.streams.get(sid, {}).get("reset") is not None)
        return self.streams[sid]


class RawH2:
    """Frames written by hand (hyperframe + hpack, the `h2` package's own layers) on a raw socket: the
    peer's answers are parsed frame by frame, so a hostile sequence does not depend on a client's state."""

    PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

    def __init__(self, port: int) -> None:
        import hpack
        self.port = port
        self.encoder = hpack.Encoder()
        self.frames: list = []
        self._reader = self._writer = None

    async def __aenter__(self) -> "RawH2":
        from hyperframe.frame import SettingsFrame
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        self._writer.write(self.PREFACE + SettingsFrame(0).serialize())
        return self

    async def __aexit__(self, *exc) -> None:
        self._writer.close()

    def send(self, *frames) -> None:
        self._writer.write(b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames))

    def headers(self, stream_id: int, path: str = "/", end_stream: bool = True, end_headers: bool = True,
                extra=()):
        from hyperframe.frame import HeadersFrame
        block = self.encoder.encode([(":method", "GET"), (":scheme", "http"), (":authority", "app.local"),
                                     (":path", path), *extra])
        flags = (["END_STREAM"] if end_stream else []) + (["END_HEADERS"] if end_headers else [])
        return HeadersFrame(stream_id, data=block, flags=flags)

    async def until(self, predicate, timeout: float = 10.0):
        """Read frames until one satisfies `predicate` (returned), or the connection closes (None)."""
        from hyperframe.frame import Frame
        async with asyncio.timeout(timeout):
            while True:
                try:
                    head = await self._reader.readexactly(9)
                    frame, length = Frame.parse_frame_header(memoryview(head))
                    body = await self._reader.readexactly(length)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return None
                frame.parse_body(memoryview(body))
                self.frames.append(frame)
                if predicate(frame):
                    return frame

    async def goaway(self, timeout: float = 10.0):
        from hyperframe.frame import GoAwayFrame
        return await self.until(lambda f: isinstance(f, GoAwayFrame), timeout)
