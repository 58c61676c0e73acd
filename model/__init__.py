"""Generators: turn a prepared portrait and a window of audio into video frames.

This package never imports web, WebRTC or session-store code; the session engine
(`avatar`) is its only caller.
"""
import logging

logger = logging.getLogger(__name__)
