"""The HTTP/WebSocket server: REST, server-sent events and the ``/ws`` command channel.

``serve(config)`` runs it inside a trio nursery (``task_status`` hands back the real address);
``serve_forever()`` is ``nodejob serve``. The server talks to the core only through the
JobExecutionManager, its Store and its MessageLog; nothing under ``nodejob.server`` imports
apsw or an execution backend, and the core never imports the server.
"""

from nodejob.server.app import ServerInfo, create_app, serve, serve_forever

__all__ = ["ServerInfo", "create_app", "serve", "serve_forever"]
