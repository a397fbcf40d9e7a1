"""VideoWriter / write_video: H.264 round trip, even-size padding, atomic rename, clean-up on interruption."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from dpft.errors import DpftError
from dpft.envs.video import VideoWriter, temp_path_for, write_video

imageio = pytest.importorskip("imageio")
imageio_ffmpeg = pytest.importorskip("imageio_ffmpeg")


def _frames(n=12, h=64, w=64):
    """Frames with distinct flat gray levels and a white square moving right (easy to check after lossy coding)."""
    out = []
    for i in range(n):
        f = np.full((h, w, 3), 10 + 18 * i, dtype=np.uint8)
        f[8:24, 4 * i:4 * i + 16] = 255
        out.append(f)
    return out


def _decode(path):
    reader = imageio.v2.get_reader(path)
    try:
        meta = reader.get_meta_data()
        frames = [np.asarray(f) for f in reader]
    finally:
        reader.close()
    return frames, meta


def test_round_trip_h264(tmp_path):
    frames = _frames()
    path = str(tmp_path / "sub" / "clip.mp4")
    assert write_video(path, frames, fps=20) == path
    assert sorted(os.listdir(tmp_path / "sub")) == ["clip.mp4"]  # temp file renamed away

    decoded, meta = _decode(path)
    assert len(decoded) == 12
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in decoded)
    assert meta["codec"] == "h264"
    assert meta["pix_fmt"].startswith("yuv420p")
    assert meta["fps"] == pytest.approx(20.0)
    # content survives lossy coding: flat background level of each frame and the moving square
    for i, f in enumerate(decoded):
        assert abs(float(f[40:, :, :].mean()) - (10 + 18 * i)) < 4.0, i
        assert f[12:20, 4 * i + 4:4 * i + 12].mean() > 200, i
    assert imageio_ffmpeg.count_frames_and_secs(path)[0] == 12


def test_ffprobe_reports_h264(tmp_path):
    ffprobe = shutil.which("ffprobe")
    if ffprobe is None:
        pytest.skip("ffprobe not installed (the imageio decoder check in test_round_trip_h264 still runs)")
    path = write_video(str(tmp_path / "clip.mp4"), _frames(), fps=20)
    out = subprocess.run([ffprobe, "-v", "error", "-select_streams", "v:0", "-count_frames", "-show_entries",
                          "stream=codec_name,width,height,pix_fmt,nb_read_frames", "-of", "json", path],
                         capture_output=True, text=True, check=True)
    stream = json.loads(out.stdout)["streams"][0]
    assert stream["codec_name"] == "h264"
    assert (stream["width"], stream["height"]) == (64, 64)
    assert stream["pix_fmt"] == "yuv420p"
    assert int(stream["nb_read_frames"]) == 12


def test_odd_size_is_padded_to_even(tmp_path):
    frames = [np.zeros((63, 65, 3), np.uint8) for _ in range(4)]
    for f in frames:
        f[:, :32] = 200
    path = str(tmp_path / "odd.mp4")
    with VideoWriter(path, fps=10) as video:
        for f in frames:
            video.append(f)
    assert video.frame_size == (64, 66)
    decoded, _ = _decode(path)
    assert len(decoded) == 4 and decoded[0].shape == (64, 66, 3)
    assert decoded[0][:, :28].mean() > 190 and decoded[0][:, 36:].mean() < 10


def test_temp_file_until_close(tmp_path):
    path = str(tmp_path / "ep.mp4")
    tmp_name = ".ep.tmp-%d.mp4" % os.getpid()
    assert temp_path_for(path) == str(tmp_path / tmp_name)
    video = VideoWriter(path, fps=20)
    for f in _frames(3):
        video.append(f)
    # nothing under the final name while writing (ffmpeg creates the temp file once it has encoded a frame)
    assert os.listdir(tmp_path) in ([], [tmp_name])
    video.close()
    assert os.path.exists(path) and not os.path.exists(temp_path_for(path))


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_interrupted_write_leaves_no_file(tmp_path, exc):
    path = str(tmp_path / "broken.mp4")
    with pytest.raises(exc):
        with VideoWriter(path, fps=20) as video:
            for i, f in enumerate(_frames(6)):
                video.append(f)
                if i == 3:
                    raise exc("stop")
    assert os.listdir(tmp_path) == []


def test_interrupted_rewrite_keeps_previous_video(tmp_path):
    path = str(tmp_path / "same.mp4")
    write_video(path, _frames(5))
    before = open(path, "rb").read()
    with pytest.raises(ValueError):
        with VideoWriter(path) as video:
            video.append(_frames(1)[0])
            raise ValueError("crash mid-episode")
    assert open(path, "rb").read() == before
    assert sorted(os.listdir(tmp_path)) == ["same.mp4"]


def test_bad_frames_raise_and_clean_up(tmp_path):
    path = str(tmp_path / "bad.mp4")
    with pytest.raises(DpftError, match=r"frame 1 is 32x32 but the video's frames are 64x64"):
        with VideoWriter(path) as video:
            video.append(np.zeros((64, 64, 3), np.uint8))
            video.append(np.zeros((32, 32, 3), np.uint8))
    assert os.listdir(tmp_path) == []
    with pytest.raises(DpftError, match=r"shape \(64, 64, 5\)"):
        write_video(path, [np.zeros((64, 64, 5), np.uint8)])
    with pytest.raises(DpftError, match="dtype int32"):
        write_video(path, [np.full((8, 8, 3), 300, np.int32)])
    with pytest.raises(DpftError, match="no frames were written"):
        write_video(path, [])
    with pytest.raises(DpftError, match=r"must end with \.mp4"):
        VideoWriter(str(tmp_path / "clip.avi"))
    assert os.listdir(tmp_path) == []


def test_float_frames_in_unit_range_are_converted(tmp_path):
    frames = [np.full((16, 16, 3), 0.5, np.float32) for _ in range(3)]
    decoded, _ = _decode(write_video(str(tmp_path / "f.mp4"), frames))
    assert len(decoded) == 3 and abs(float(decoded[0].mean()) - 128) < 4


def test_a_file_damaged_while_finishing_never_gets_the_final_name(tmp_path, monkeypatch):
    """imageio-ffmpeg does not check ffmpeg's exit status; a truncated file must not be renamed into place."""
    import imageio_ffmpeg

    path = str(tmp_path / "ep.mp4")
    real = imageio_ffmpeg.count_frames_and_secs
    monkeypatch.setattr(imageio_ffmpeg, "count_frames_and_secs", lambda p: (real(p)[0] - 1, 0.0))
    video = VideoWriter(path, fps=20)
    for f in _frames(4):
        video.append(f)
    with pytest.raises(DpftError, match="damaged .3 of 4 frames decode.; nothing was written under the final name"):
        video.close()
    assert os.listdir(tmp_path) == []
