"""MediaPipe face mesh (478 refined landmarks) on still images and video frames.

Shared by the CPU animator (landmarks of the portrait) and the quality measure
(mouth aperture on rendered video), so both read the face the same way.
"""
from __future__ import annotations

import numpy as np

# Landmark indices of MediaPipe's canonical face mesh.
UPPER_LIP_INNER = 13
LOWER_LIP_INNER = 14
MOUTH_LEFT = 61
MOUTH_RIGHT = 291
FOREHEAD = 10
CHIN = 152
LEFT_EYE_OUTER = 263
RIGHT_EYE_OUTER = 33


def _face_mesh(static: bool, max_faces: int):
    # Imported lazily: mediapipe takes about a second to import.
    import mediapipe as mp

    return mp.solutions.face_mesh.FaceMesh(
        static_image_mode=static,
        max_num_faces=max_faces,
        refine_landmarks=True,
        min_detection_confidence=0.5,
        min_tracking_confidence=0.5,
    )


def _to_pixels(face, width: int, height: int) -> np.ndarray:
    return np.array([(p.x * width, p.y * height, p.z * width) for p in face.landmark], dtype=np.float32)


def detect_faces(image: np.ndarray, max_faces: int = 4) -> list[np.ndarray]:
    """All faces in one RGB uint8 (H, W, 3) image, largest first.

    Returns a list of float32 (478, 3) arrays: x, y in pixels, z (depth, pixel
    scale, smaller is nearer). Empty when no face is found.
    """
    height, width = image.shape[:2]
    with _face_mesh(static=True, max_faces=max_faces) as mesh:
        result = mesh.process(np.ascontiguousarray(image))
    faces = [_to_pixels(face, width, height) for face in result.multi_face_landmarks or []]
    return sorted(faces, key=lambda pts: -np.ptp(pts[:, 0]) * np.ptp(pts[:, 1]))


class FaceTracker:
    """Face mesh over the frames of one video (tracking mode: faster than per-image).

    ``track(frame)`` takes RGB uint8 (H, W, 3) and returns float32 (478, 3) pixel
    landmarks of the largest face, or None when no face is found. Use as a context
    manager, or call ``close()``.
    """

    def __init__(self) -> None:
        self._mesh = _face_mesh(static=False, max_faces=1)

    def track(self, frame: np.ndarray) -> np.ndarray | None:
        height, width = frame.shape[:2]
        result = self._mesh.process(np.ascontiguousarray(frame))
        if not result.multi_face_landmarks:
            return None
        return _to_pixels(result.multi_face_landmarks[0], width, height)

    def close(self) -> None:
        self._mesh.close()

    def __enter__(self) -> FaceTracker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def mouth_aperture(landmarks: np.ndarray) -> float:
    """Inner-lip opening over face height (forehead to chin), dimensionless, >= 0.

    ``landmarks``: (478, 2 or 3) pixel landmarks. About 0 with lips closed,
    0.1 to 0.2 for a wide-open vowel.
    """
    gap = np.linalg.norm(landmarks[LOWER_LIP_INNER, :2] - landmarks[UPPER_LIP_INNER, :2])
    face_height = np.linalg.norm(landmarks[CHIN, :2] - landmarks[FOREHEAD, :2])
    return float(gap / face_height)
