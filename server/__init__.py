"""The streaming session server (HTTP/WebSocket API, WebRTC, session store).

It talks to generators only through the session engine (`avatar`).
"""
import logging

logger = logging.getLogger(__name__)
