"""Writing and reading clips: mp4 (H.264), webm (VP9), animated webp and gif.

mp4/webm go through the ffmpeg binary that imageio-ffmpeg ships (no system ffmpeg needed); webp and gif through
Pillow, which writes animated files exactly and keeps every frame. An existing file is never overwritten: the
next free name (`clip_00001.mp4`, ...) is used instead.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import torch

FORMATS = ("mp4", "webm", "webp", "gif")


def to_uint8(frames: torch.Tensor | np.ndarray) -> np.ndarray:
    """IMAGE frames [T, H, W, 3] float 0..1 (or uint8) -> contiguous uint8 numpy."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        if frames.is_floating_point():
            frames = (frames.float().clamp(0, 1) * 255).round().to(torch.uint8)
        frames = frames.numpy()
    if frames.dtype != np.uint8:
        frames = (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected frames shaped [T, H, W, 3], got {list(frames.shape)}")
    return np.ascontiguousarray(frames)


def free_path(path: str | Path) -> Path:
    """`path` if nothing is there yet, else the first free `stem_NNNNN.ext` beside it."""
    path = Path(path)
    if not path.exists():
        return path
    for i in range(1, 100000):
        candidate = path.with_name(f"{path.stem}_{i:05d}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(f"no free file name left for {path}")


def write_video(frames, path: str | Path, fps: float = 16, crf: int = 19, metadata: dict | None = None,
                overwrite: bool = False) -> Path:
    """Write frames to `path` (format from the extension). `metadata` values (e.g. the ComfyUI `prompt` and
    `workflow`) are stored as JSON container tags in mp4/webm and as text chunks where the format allows.
    Returns the path actually written (a new name if `path` exists and overwrite is False)."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise ValueError(f"cannot write {path.name!r}: the video formats are {', '.join(FORMATS)}")
    data = to_uint8(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite:
        path = free_path(path)
    tags = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    # Write beside the target and rename at the end, so a failed or cancelled write leaves no half file.
    tmp = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        if fmt in ("mp4", "webm"):
            _ffmpeg_write(data, tmp, fmt, fps, crf, tags)
        else:
            _pillow_write(data, tmp, fmt, fps, tags)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _imageio_ffmpeg():
    """imageio-ffmpeg (its bundled ffmpeg binary), or an error that says how to get it: a pack cloned into
    custom_nodes without `pip install -r requirements.txt` imports fine and would otherwise fail only at the save."""
    try:
        import imageio_ffmpeg
    except ImportError as e:
        raise ImportError("mp4 and webm need the imageio-ffmpeg package, which is not installed in this Python: run "
                          "`pip install -r requirements.txt` in Zoetrope's folder with the Python that runs ComfyUI "
                          "(webp and gif work without it)") from e
    return imageio_ffmpeg


def _ffmpeg_write(data: np.ndarray, path: Path, fmt: str, fps: float, crf: int, tags: dict):
    imageio_ffmpeg = _imageio_ffmpeg()
    t, h, w, _ = data.shape
    if fmt == "mp4" and (h % 2 or w % 2):
        # yuv420p needs even sides: repeat the last row/column rather than scaling the picture.
        data = np.pad(data, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        t, h, w, _ = data.shape
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", str(fps), "-i", "-"]
    if fmt == "mp4":
        cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(crf), "-preset", "medium",
                "-movflags", "use_metadata_tags+faststart"]
    else:
        cmd += ["-c:v", "libvpx-vp9", "-pix_fmt", "yuv420p", "-crf", str(crf), "-b:v", "0"]
    for k, v in tags.items():
        cmd += ["-metadata", f"{k}={v}"]
    cmd += ["-f", fmt, str(path)]
    proc = subprocess.run(cmd, input=data.tobytes(), capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError(f"ffmpeg could not write {path.name}: {proc.stderr.decode(errors='replace').strip()}")


def _pillow_write(data: np.ndarray, path: Path, fmt: str, fps: float, tags: dict):
    from PIL import Image
    images = [Image.fromarray(f) for f in data]
    duration = max(1, round(1000 / fps))
    kwargs = dict(save_all=True, append_images=images[1:], duration=duration, loop=0)
    if fmt == "webp":
        kwargs.update(lossless=False, quality=90)
        if tags:
            kwargs["exif"] = _exif(tags)
    else:
        kwargs["disposal"] = 1
        if tags:
            kwargs["comment"] = json.dumps(tags)
    images[0].save(path, format=fmt.upper(), **kwargs)


def _exif(tags: dict) -> bytes:
    """ComfyUI's convention for webp: each tag in an EXIF field as 'key:value' (0x010F Make, 0x010E ...)."""
    from PIL import Image
    exif = Image.Exif()
    field = 0x010F
    for k, v in tags.items():
        exif[field] = f"{k}:{v}"
        field -= 1
    return exif.tobytes()


def read_tags(path: str | Path) -> dict:
    """The container tags of an mp4/webm (what ComfyUI reads back when the file is dropped on the page)."""
    cmd = [_imageio_ffmpeg().get_ffmpeg_exe(), "-hide_banner", "-i", str(path), "-f", "ffmetadata", "-"]
    proc = subprocess.run(cmd, capture_output=True)
    tags, key = {}, None
    for line in proc.stdout.decode("utf-8", errors="replace").splitlines()[1:]:
        if key is not None and tags[key].endswith("\\"):   # ffmetadata escapes newlines with a backslash
            tags[key] = tags[key][:-1] + "\n" + line
            continue
        if "=" in line and not line.startswith(";"):
            key, _, value = line.partition("=")
            tags[key] = value
    return {k: _unescape(v) for k, v in tags.items()}


def _unescape(value: str) -> str:
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value):
            out.append(value[i + 1])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def read_video(path: str | Path) -> np.ndarray:
    """Decode a clip to uint8 [T, H, W, 3]."""
    path = Path(path)
    if path.suffix.lower() in (".webp", ".gif"):
        from PIL import Image, ImageSequence
        with Image.open(path) as im:
            return np.stack([np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)])
    reader = _imageio_ffmpeg().read_frames(str(path), pix_fmt="rgb24")
    meta = next(reader)
    w, h = meta["size"]
    frames = [np.frombuffer(f, dtype=np.uint8).reshape(h, w, 3) for f in reader]
    return np.stack(frames)
