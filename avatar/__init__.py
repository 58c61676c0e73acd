"""The session engine: audio in, generation windows, one media clock, interruptions, offline render."""
import logging

logger = logging.getLogger(__name__)
