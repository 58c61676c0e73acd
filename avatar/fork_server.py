"""Set-up of multiprocessing's fork server for generator worker processes
(imported by the fork server only: ``avatar.generator_process`` names it last in
the preload list).

Two things make a worker start in tens of milliseconds instead of 1-1.5 s:

* The main module is imported here, once. Each worker must have it (pickled
  objects may live there); when the fork server lacks it, every worker runs the
  main script again: for the server or a benchmark, the whole server's imports.
  The fork server is meant to preload it (``'__main__'`` in the preload list)
  but CPython 3.11's forkserver asks for a ``main_path`` key that its
  preparation data never holds (it is called ``init_main_from_path``), so it
  never does; the parent passes the path in ``FORK_SERVER_MAIN_ENV`` instead.
* ``gc.freeze()``: a worker shares the fork server's memory copy-on-write, and a
  garbage collection that walks every inherited object writes to each one,
  copying the heap. Frozen objects are not walked (the use the gc module
  documents for processes that fork).
"""
import gc
import os
from multiprocessing import spawn

from avatar.generator_process import FORK_SERVER_MAIN_ENV

_main_path = os.environ.get(FORK_SERVER_MAIN_ENV)
if _main_path:
    spawn.import_main_path(_main_path)
gc.freeze()
