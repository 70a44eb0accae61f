"""The web console at ``/console``: a plain HTML page with a small hand-written script and style
sheet, shipped in the package (``static/``), over the admin API; ``_routes`` adds the few API
calls only the console needed (the live stream, pattern checks, the rules sandbox, rates).
"""

from eventbus.http._console._routes import admin, public

__all__ = ["admin", "public"]
