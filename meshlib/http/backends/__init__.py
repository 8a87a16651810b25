"""The I/O that differs between the sync and the async HTTP drivers, behind one interface.

Everything else about the drivers (the connection pool, the response body, the transport's
call loop and its hedged twin) is written once, as async code in ``meshlib/http/_async/``,
and the sync code in ``meshlib/http/_sync/`` is generated from it by ``scripts/unasync.py``
(as httpcore does). What cannot be generated lives here, by hand, in two modules with the
same names in them (the generator maps ``backends.aio`` to ``backends.sync`` and
``Async<Name>`` to ``Sync<Name>``):

* ``connect(key, timeout)``: ``loop.create_connection`` / ``socket.create_connection``;
* ``AsyncConnection`` / ``SyncConnection``: an ``asyncio.Protocol`` / a blocking socket, with
  ``fill(timeout)`` (wait for ``data_received`` / ``recv``), ``send(data, timeout)``
  (``write``, draining when paused / ``sendall``), ``usable()`` (EOF, error or bytes seen by
  the protocol / a non-blocking ``MSG_PEEK``), ``park()`` (resume reading when paused /
  nothing to do) and ``close()``;
* ``discard(response)``: read a response to its end and close it;
* ``sleep(seconds)``: ``asyncio.sleep`` / ``time.sleep``;
* ``AsyncHedges`` / ``SyncHedges``: the attempts of hedged calls as tasks / on a small thread
  pool (``start``, ``wait_first``, ``cancel``, ``drop``, ``close``).

A connection raises the httpx exceptions httpx's own transport raises (``ConnectError``,
``ConnectTimeout``, ``ReadTimeout``, ``WriteTimeout``, ``ReadError``, ``WriteError``).
"""
