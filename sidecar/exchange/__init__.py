"""The exchange types every layer of the data plane depends down on (no module here imports a layer).

    types.py    Exchange, Call, Reply, Degraded, record_decision
    context.py  Context (one policy generation and its services), Services, the Transport protocol
    state.py    RouteState: breakers, budget, limits and cache of a route, surviving reloads
    body.py     RequestBody: replayable when small, streamed once when large
    calls.py    the request a target is sent (upstream URL, Host, configured headers)
    headers.py  hop-by-hop headers
    records.py  the one builder of a RequestRecord (the trace's root span of a request)
    replies.py  the one builder of a JSON error answer
"""
