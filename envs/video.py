"""MP4 (H.264, yuv420p) writing that never leaves a truncated file under the final name.

:class:`VideoWriter` streams frames to ffmpeg (the binary bundled with ``imageio-ffmpeg``) into a hidden temporary
file ``<dir>/.<name>.tmp.mp4`` next to the target and renames it to the target only when :meth:`VideoWriter.close`
finishes cleanly. An exception or ``KeyboardInterrupt`` inside the ``with`` block (or :meth:`VideoWriter.abort`)
stops ffmpeg and deletes the temporary file, so a file under the final name is always a complete video.

yuv420p needs even frame sizes: frames are padded (edge pixels repeated on the bottom / right) up to a multiple of
``macro_block_size`` (2 by default; 16 for the strictest players) instead of being rescaled, and ffmpeg is told
not to rescale them either.

Example::

    from dpft.envs.video import VideoWriter, write_video

    with VideoWriter("runs/lift/eval/episode_0.mp4", fps=20) as video:
        for frame in frames:              # (H, W, 3) uint8, upright
            video.append(frame)
    write_video("clip.mp4", frames, fps=20)   # the same in one call
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Tuple

import numpy as np

from dpft.errors import DpftError


def temp_path_for(path: str) -> str:
    """The hidden temporary file a video for ``path`` is written to first: ``<dir>/.<stem>.tmp-<pid>.mp4`` (the
    pid keeps two writers of the same video from sharing a temporary file)."""
    directory, name = os.path.split(os.path.abspath(path))
    stem = name[:-4] if name.lower().endswith(".mp4") else name
    return os.path.join(directory, ".{}.tmp-{}.mp4".format(stem, os.getpid()))


def _as_rgb_uint8(frame: Any, index: int, path: str) -> np.ndarray:
    """Check one frame and return it as a C-contiguous ``(H, W, 3)`` uint8 array."""
    arr = np.asarray(frame)
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise DpftError(
            "Video {}: frame {} has shape {}; expected an RGB image (H, W, 3) (or (H, W) gray / (H, W, 4) RGBA), "
            "uint8, upright.".format(path, index, tuple(arr.shape))
        )
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.size and np.nanmin(arr) >= 0.0 and np.nanmax(arr) <= 1.0:
            arr = np.round(np.nan_to_num(arr) * 255.0).astype(np.uint8)
        else:
            raise DpftError(
                "Video {}: frame {} has dtype {}; expected uint8 pixels in [0, 255] (or floats in [0, 1]).".format(
                    path, index, arr.dtype)
            )
    return np.ascontiguousarray(arr)


def _pad_to_multiple(frame: np.ndarray, block: int) -> np.ndarray:
    h, w = frame.shape[:2]
    ph, pw = (-h) % block, (-w) % block
    if ph == 0 and pw == 0:
        return frame
    return np.ascontiguousarray(np.pad(frame, ((0, ph), (0, pw), (0, 0)), mode="edge"))


class VideoWriter:
    """Write an H.264 MP4 frame by frame; the file appears under ``path`` only after a clean :meth:`close`.

    Args:
        path: the final ``.mp4`` file (parent directories are created).
        fps: frames per second (robomimic and robosuite use 20 for control_freq 20).
        codec: ffmpeg video codec (``libx264`` = H.264).
        quality: ffmpeg variable-bitrate quality 0..10 (imageio's scale; 5 by default).
        macro_block_size: frames are padded to a multiple of this (>= 2 because yuv420p needs even sizes).

    Attributes:
        frames_written: number of frames appended so far.
        frame_size: ``(H, W)`` of the stored frames (after padding), set by the first frame.
    """

    def __init__(self, path: Any, fps: float = 20, codec: str = "libx264", quality: Optional[float] = 5,
                 macro_block_size: int = 2):
        self.path = os.fspath(path)
        if not self.path.lower().endswith(".mp4"):
            raise DpftError("Video path {!r} must end with .mp4 (H.264 in an MP4 container).".format(self.path))
        if not (float(fps) > 0):
            raise DpftError("Video {}: fps must be > 0, got {!r}.".format(self.path, fps))
        if int(macro_block_size) < 2 or int(macro_block_size) % 2:
            raise DpftError("Video {}: macro_block_size must be an even number >= 2 (yuv420p needs even sizes), "
                            "got {!r}.".format(self.path, macro_block_size))
        self.fps = float(fps)
        self.codec = codec
        self.quality = quality
        self.macro_block_size = int(macro_block_size)
        self.tmp_path = temp_path_for(self.path)
        self.frames_written = 0
        self.frame_size = None  # type: Optional[Tuple[int, int]]
        self._input_size = None  # type: Optional[Tuple[int, int]]
        self._gen = None  # type: Any
        self._closed = False

    # -- context manager ---------------------------------------------------------------------------------------
    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- writing -----------------------------------------------------------------------------------------------
    def _start(self, height: int, width: int) -> None:
        try:
            import imageio_ffmpeg
        except ImportError as e:  # pragma: no cover - a declared dependency
            raise DpftError("Writing videos needs imageio-ffmpeg: pip install imageio-ffmpeg ({}).".format(e))
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)
        self._gen = imageio_ffmpeg.write_frames(
            self.tmp_path, (width, height), pix_fmt_in="rgb24", pix_fmt_out="yuv420p", fps=self.fps,
            quality=self.quality, codec=self.codec, macro_block_size=1, ffmpeg_log_level="error",
            output_params=["-movflags", "+faststart"],
        )
        self._gen.send(None)

    def append(self, frame: Any) -> None:
        """Add one upright frame ``(H, W, 3)`` uint8; every frame must have the first frame's size."""
        if self._closed:
            raise DpftError("Video {}: append() after close() / abort().".format(self.path))
        arr = _as_rgb_uint8(frame, self.frames_written, self.path)
        if self._input_size is None:
            self._input_size = (arr.shape[0], arr.shape[1])
        elif (arr.shape[0], arr.shape[1]) != self._input_size:
            raise DpftError("Video {}: frame {} is {}x{} but the video's frames are {}x{} (H x W); all frames must "
                            "have the same size.".format(self.path, self.frames_written, arr.shape[0], arr.shape[1],
                                                         *self._input_size))
        arr = _pad_to_multiple(arr, self.macro_block_size)
        if self._gen is None:
            self.frame_size = (arr.shape[0], arr.shape[1])
            self._start(arr.shape[0], arr.shape[1])
        try:
            self._gen.send(arr)
        except Exception as e:
            self.abort()
            raise DpftError("Video {}: ffmpeg stopped while writing frame {} ({}: {}).".format(
                self.path, self.frames_written, type(e).__name__, e))
        self.frames_written += 1

    # alias matching imageio's writer API
    append_data = append

    def close(self) -> str:
        """Finish the file and move it to ``path``; returns ``path``. A video without frames is an error."""
        if self._closed:
            return self.path
        self._closed = True
        if self._gen is None:
            raise DpftError("Video {}: no frames were written, so no file was created.".format(self.path))
        gen, self._gen = self._gen, None
        try:
            gen.close()
        except BaseException as e:
            self._remove_tmp()
            if isinstance(e, Exception):
                raise DpftError("Video {}: ffmpeg failed to finish the file ({}: {}).".format(
                    self.path, type(e).__name__, e))
            raise
        if not os.path.exists(self.tmp_path) or os.path.getsize(self.tmp_path) == 0:
            self._remove_tmp()
            raise DpftError("Video {}: ffmpeg produced no output.".format(self.path))
        import imageio_ffmpeg

        # imageio-ffmpeg does not check ffmpeg's exit status when finishing: decode-count the file before it may
        # take the final name, so a video damaged while being finalized (e.g. disk full) never looks complete
        try:
            decoded = imageio_ffmpeg.count_frames_and_secs(self.tmp_path)[0]
        except Exception as e:  # unreadable container
            decoded, reason = -1, "{}: {}".format(type(e).__name__, e)
        else:
            reason = "{} of {} frames decode".format(decoded, self.frames_written)
        if decoded != self.frames_written:
            self._remove_tmp()
            raise DpftError("Video {}: the finished file is damaged ({}); nothing was written under the final name."
                            .format(self.path, reason))
        with open(self.tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self.tmp_path, self.path)
        return self.path

    def abort(self) -> None:
        """Stop writing and delete the temporary file; nothing is left under ``path``."""
        self._closed = True
        gen, self._gen = self._gen, None
        if gen is not None:
            try:
                gen.close()
            except BaseException:
                pass
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        try:
            os.remove(self.tmp_path)
        except OSError:
            pass

    def __del__(self) -> None:  # an unclosed, garbage-collected writer leaves nothing behind
        try:
            if not self._closed:
                self.abort()
        except Exception:
            pass


def write_video(path: Any, frames: Iterable[Any], fps: float = 20, codec: str = "libx264") -> str:
    """Write ``frames`` (each ``(H, W, 3)`` uint8, upright) to an H.264 MP4 at ``path`` atomically; returns path."""
    with VideoWriter(path, fps=fps, codec=codec) as writer:
        for frame in frames:
            writer.append(frame)
    return writer.path
