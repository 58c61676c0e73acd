"""The CPU animator: a real-time talking-portrait generator built on a face rig.

Modules: ``landmarks`` (face-mesh groups, face frame), ``grid`` and ``membrane``
(field grids, harmonic interpolation), ``rig`` and ``body_rig`` (basis
displacement fields), ``warp`` (per-frame warp), ``mouth`` and ``eyes``
(painted interior, lash line), ``curve_band`` (anti-aliased bands),
``audio_features`` and ``visemes`` (audio -> mouth shape), ``motion``
(blinks, head, breathing), ``prepare`` and ``renderer``, ``generator``.
"""
from model.animator.generator import CpuAnimator

__all__ = ["CpuAnimator"]
