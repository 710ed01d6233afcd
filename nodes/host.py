"""The host the nodes run in: ComfyUI, or a standalone stand-in for the command line and the tests.

This is the one module that imports ComfyUI (`folder_paths`, `comfy.utils`, `comfy.model_management`,
`comfy.cli_args`, `server`). It does so lazily, inside each function, and only when ComfyUI has already loaded
those modules itself; so importing the pack costs nothing and can never break ComfyUI's start-up. Outside
ComfyUI the same functions fall back to: a models folder (`--models-dir` or ZOETROPE_MODELS, with the
subfolders `diffusion_models`, `text_encoders`, `vae`), `output/` and `input/` in the working directory, a
tqdm progress bar and an interrupt flag that `request_interrupt()` sets.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("zoetrope")

MODEL_FOLDERS = ("diffusion_models", "text_encoders", "vae")
MODEL_EXTENSIONS = (".safetensors", ".sft", ".pth", ".pt", ".bin", ".ckpt")


@dataclass
class _Standalone:
    forced: bool = False               # the headless runner: never use ComfyUI, even where it is importable
    models_dir: Path | None = None
    output_dir: Path | None = None
    input_dir: Path | None = None
    interrupted: bool = False


_standalone = _Standalone()


class Interrupted(Exception):
    """Cancel outside ComfyUI (inside it, ComfyUI's own InterruptProcessingException is raised instead)."""


def configure(*, standalone: bool | None = None, models_dir: str | Path | None = None,
              output_dir: str | Path | None = None, input_dir: str | Path | None = None) -> None:
    """Set the standalone host's folders (the runner's --models-dir and --output-dir)."""
    if standalone is not None:
        _standalone.forced = standalone
    if models_dir is not None:
        _standalone.models_dir = Path(models_dir)
    if output_dir is not None:
        _standalone.output_dir = Path(output_dir)
    if input_dir is not None:
        _standalone.input_dir = Path(input_dir)


def in_comfyui() -> bool:
    """True when ComfyUI has loaded its modules: we look at sys.modules rather than import anything."""
    if _standalone.forced:
        return False
    fp = sys.modules.get("folder_paths")
    return fp is not None and hasattr(fp, "get_filename_list") and "comfy.model_management" in sys.modules


def _mm():
    import comfy.model_management
    return comfy.model_management


# ---------------------------------------------------------------------------------------------------------------
# Files

def models_dir() -> Path | None:
    if _standalone.models_dir is not None:
        return _standalone.models_dir
    env = os.environ.get("ZOETROPE_MODELS")
    if env:
        return Path(env)
    return Path("models") if Path("models").is_dir() else None


def list_models(folder: str) -> list[str]:
    """File names in one of the model folders, as the loaders' dropdowns show them (relative, '/'-separated)."""
    if folder not in MODEL_FOLDERS:
        raise ValueError(f"unknown model folder {folder!r}; expected one of {', '.join(MODEL_FOLDERS)}")
    if in_comfyui():
        import folder_paths
        return list(folder_paths.get_filename_list(folder))
    root = models_dir()
    if root is None or not (root / folder).is_dir():
        return []
    base = root / folder
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*")
                  if p.is_file() and p.name.lower().endswith(MODEL_EXTENSIONS))


def model_path(folder: str, name: str) -> Path:
    """The full path of a file chosen in a loader. Outside ComfyUI a path to an existing file is taken as is,
    so the command line can point a loader anywhere (`--set 3.model_name=/path/to/file.safetensors`)."""
    if in_comfyui():
        import folder_paths
        return Path(folder_paths.get_full_path_or_raise(folder, name))
    root = models_dir()
    if root is not None and (root / folder / name).is_file():
        return root / folder / name
    if Path(name).is_file():
        return Path(name)
    where = f"{root / folder}" if root is not None else "no models folder (set --models-dir or ZOETROPE_MODELS)"
    raise FileNotFoundError(f"model file {name!r} not found in {where}; put it in the {folder!r} folder or give "
                            "the path of an existing file")


def output_directory() -> Path:
    if in_comfyui():
        import folder_paths
        return Path(folder_paths.get_output_directory())
    return (_standalone.output_dir or Path("output")).absolute()


def input_directory() -> Path:
    if in_comfyui():
        import folder_paths
        return Path(folder_paths.get_input_directory())
    return (_standalone.input_dir or Path("input")).absolute()


def input_path(name: str) -> Path:
    """An input file (a start image): ComfyUI's annotated input path, else input/ or a path as given."""
    if in_comfyui():
        import folder_paths
        return Path(folder_paths.get_annotated_filepath(name))
    base = input_directory()
    if (base / name).is_file():
        return base / name
    if Path(name).is_file():
        return Path(name)
    raise FileNotFoundError(f"input file {name!r} not found in {base}; put it there or give the path of an "
                            "existing image")


def save_path(filename_prefix: str, width: int = 0, height: int = 0) -> tuple[Path, str, int, str]:
    """Where a save node writes: (folder, file stem, counter, subfolder relative to the output folder).

    `filename_prefix` may hold subfolders ("videos/cat"); one that would leave the output folder ("../x",
    an absolute path) is refused. The counter continues after the highest `stem_NNNNN_` already there.
    """
    out = output_directory()
    if in_comfyui():
        import folder_paths
        folder, stem, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, str(out), width,
                                                                               height)
        return Path(folder), stem, counter, subfolder
    return standalone_save_path(filename_prefix, out)


def standalone_save_path(filename_prefix: str, out: Path) -> tuple[Path, str, int, str]:
    """ComfyUI's get_save_image_path rules, for the standalone host (and testable without ComfyUI)."""
    prefix = filename_prefix.replace("\\", "/").strip()
    if not prefix or prefix.endswith("/"):
        raise ValueError(f"filename_prefix {filename_prefix!r} names no file; give one such as 'videos/zoetrope'")
    if prefix.startswith("/") or (len(prefix) > 1 and prefix[1] == ":"):
        raise ValueError(f"filename_prefix {filename_prefix!r} is an absolute path; it must stay inside the output "
                         f"folder {out}: give a relative prefix such as 'videos/zoetrope'")
    out = out.resolve()
    target = (out / prefix).resolve()
    if os.path.commonpath([out, target.parent]) != str(out):
        raise ValueError(f"filename_prefix {filename_prefix!r} leads outside the output folder {out}; saving there "
                         "is not allowed: remove the '..' parts")
    folder, stem = target.parent, target.name
    subfolder = folder.relative_to(out).as_posix()
    subfolder = "" if subfolder == "." else subfolder
    counter = 1
    if folder.is_dir():
        for p in folder.iterdir():
            rest = p.name[len(stem) + 1:] if p.name.startswith(stem + "_") else ""
            digits = rest[:5]
            if len(digits) == 5 and digits.isdigit() and rest[5:6] == "_":
                counter = max(counter, int(digits) + 1)
    return folder, stem, counter, subfolder


def metadata_enabled() -> bool:
    """False when ComfyUI runs with --disable-metadata."""
    if in_comfyui():
        try:
            from comfy.cli_args import args
        except ImportError:
            return True
        return not getattr(args, "disable_metadata", False)
    return True


# ---------------------------------------------------------------------------------------------------------------
# Devices and memory

def compute_device(choice: str = "auto"):
    """The torch device a model computes on: "auto" (ComfyUI's device, else CUDA when present), "cpu", "gpu"."""
    import torch
    if choice not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device {choice!r} is not one of auto, cpu, gpu")
    if choice == "cpu":
        return torch.device("cpu")
    if in_comfyui():
        device = _mm().get_torch_device()
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "gpu" and device.type == "cpu":
        raise RuntimeError("device 'gpu' was chosen but no GPU is available here; choose 'auto' or 'cpu'")
    return device


def offload_device(device):
    """Where a model waits between stages: the CPU (or ComfyUI's offload device) when it computes on a GPU."""
    import torch
    if device.type == "cpu":
        return device
    if in_comfyui():
        return _mm().unet_offload_device()
    return torch.device("cpu")


def intermediate_device():
    """Where LATENT, IMAGE and CONDITIONING tensors travel between nodes (ComfyUI's convention: the CPU)."""
    import torch
    if in_comfyui():
        return _mm().intermediate_device()
    return torch.device("cpu")


def make_room(device, nbytes: int) -> None:
    """Ask ComfyUI to unload its own models until `nbytes` fit on `device`."""
    if in_comfyui() and device.type != "cpu":
        _mm().free_memory(nbytes, device)


def empty_cache() -> None:
    """Hand freed GPU memory back between stages."""
    if in_comfyui():
        _mm().soft_empty_cache()
        return
    import torch
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------------
# Cancel and progress

def request_interrupt() -> None:
    """Standalone Cancel: the next check_interrupt() raises. (In ComfyUI the Cancel button does this.)"""
    _standalone.interrupted = True


def check_interrupt() -> None:
    """Raise if the user cancelled. Called in every long loop; the exception must propagate, never be caught."""
    if in_comfyui():
        _mm().throw_exception_if_processing_interrupted()
        return
    if _standalone.interrupted:
        _standalone.interrupted = False
        raise Interrupted("cancelled")


def preview_max_size() -> int:
    if in_comfyui():
        try:
            from comfy.cli_args import args
            return int(getattr(args, "preview_size", 512))
        except ImportError:
            pass
    return 512


class Progress:
    """One progress bar for a node's loop: ComfyUI's (which also shows a preview image and notices Cancel), or
    tqdm. `update(value, preview)` takes a callable for the preview so it is only computed where it is shown."""

    def __init__(self, total: int, desc: str = ""):
        self.total = max(1, int(total))
        if in_comfyui():
            import comfy.utils
            self._bar = comfy.utils.ProgressBar(self.total)
            self._tqdm = None
        else:
            from tqdm import tqdm
            self._bar = None
            self._tqdm = tqdm(total=self.total, desc=desc, leave=False, dynamic_ncols=True,
                              disable=os.environ.get("ZOETROPE_QUIET") == "1")
            self._done = 0

    def update(self, value: int, preview: Callable[[], Any] | None = None) -> None:
        check_interrupt()
        if self._bar is not None:
            image = preview() if preview is not None else None
            extra = ("JPEG", image, preview_max_size()) if image is not None else None
            self._bar.update_absolute(value, self.total, extra)
        else:
            self._tqdm.update(value - self._done)
            self._done = value

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def can_send_events() -> bool:
    """Whether send_event reaches a page: ComfyUI with its PromptServer running."""
    server = sys.modules.get("server")
    return in_comfyui() and getattr(getattr(server, "PromptServer", None), "instance", None) is not None


def send_event(event: str, data: dict) -> None:
    """A message to our frontend extension (`api.addEventListener("zoetrope.<event>")`); nothing standalone."""
    if not in_comfyui():
        return
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None:
        instance.send_sync(f"zoetrope.{event}", data)


def notice(message: str, node_id: str | None = None) -> None:
    """A logged adjustment the user should know about (snapped sizes, cropped images), also shown in the page."""
    log.warning("adjusted: %s", message)
    send_event("notice", {"node": node_id, "message": message})
