"""
The sans-I/O core: validation, encoding, routing and the listener state machine.

Nothing in here waits on a socket or sleeps. State machines are generators that yield what they
need (a readable socket, a pause, a batch to deliver) and the runtime waiters in
``pgherald._waiting`` (sync) and ``pgherald._waiting_async`` (asyncio and trio, via anyio) carry
it out. The only calls made on a connection are libpq's non-blocking ones.
"""
