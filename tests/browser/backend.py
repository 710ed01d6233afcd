"""A small stand-in for ComfyUI's server, enough for the real frontend bundle to start and run our extension.

It serves the `comfyui-frontend-package` bundle at /, our js/ at /extensions/zoetrope/, node definitions generated
from our node classes (nodes/runner.py object_info, the same code the headless runner validates with), empty
settings and user data, /system_stats of this machine, an empty queue and history, /prompt (which records what it
is sent), and a websocket at /ws. ComfyUI answers every route both as /x and /api/x; so does this.

For the tests, POST /test/emit {"type", "data"} sends a message to every open websocket, as the real server's
send_sync does, and GET /test/log lists the requests it could not answer.

    python tests/browser/backend.py --port 8199 [--models-dir DIR] [--input-dir DIR]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import uuid
from pathlib import Path

from aiohttp import WSMsgType, web

ROOT = Path(__file__).resolve().parents[2]
EXTENSION_NAME = "zoetrope"


def frontend_root() -> Path:
    import comfyui_frontend_package
    return Path(comfyui_frontend_package.__file__).parent / "static"


def system_stats() -> dict:
    """What ComfyUI's /system_stats says on a machine without a GPU."""
    import comfyui_frontend_package
    pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    available = os.sysconf("SC_AVPHYS_PAGES")
    version = getattr(comfyui_frontend_package, "__version__", None)
    return {
        "system": {"os": sys.platform, "ram_total": pages * page_size, "ram_free": available * page_size,
                   "comfyui_version": "0.26.0", "required_frontend_version": version,
                   "installed_templates_version": None, "required_templates_version": None,
                   "comfy_package_versions": [], "python_version": sys.version, "pytorch_version": "",
                   "embedded_python": False, "deploy_environment": "local", "argv": ["main.py", "--cpu"]},
        "devices": [{"name": "cpu", "type": "cpu", "index": None, "vram_total": pages * page_size,
                     "vram_free": available * page_size, "torch_vram_total": 0, "torch_vram_free": 0}],
    }


class Backend:
    def __init__(self, models_dir: Path | None = None, input_dir: Path | None = None):
        if models_dir is not None:
            # The loaders' lists (and so /object_info) come from this folder, as from ComfyUI's models/.
            os.environ["ZOETROPE_MODELS"] = str(models_dir)
        from zoetrope.nodes import host, runner
        host.configure(standalone=True, input_dir=input_dir)
        self.model_folders = host.MODEL_FOLDERS
        self.models = host.list_models
        self.object_info = runner.object_info()
        self.sockets: dict[str, web.WebSocketResponse] = {}
        self.prompts: list[dict] = []
        self.unknown: list[str] = []
        self.settings: dict = {"Comfy.TutorialCompleted": True, "Comfy.InstalledVersion": "1.45.19"}
        self.userdata: dict[str, bytes] = {}
        self.static = frontend_root().resolve()

    # -- websocket -------------------------------------------------------------------------------------------
    async def ws(self, request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.rel_url.query.get("clientId") or uuid.uuid4().hex
        self.sockets[sid] = ws
        await ws.send_json({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": sid}})
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    if data.get("type") == "feature_flags":
                        await ws.send_json({"type": "feature_flags", "data": {"supports_preview_metadata": False}})
        finally:
            self.sockets.pop(sid, None)
        return ws

    async def emit(self, request):
        message = await request.json()
        for ws in list(self.sockets.values()):
            await ws.send_json(message)
        return web.json_response({"sent_to": len(self.sockets)})

    # -- the API -----------------------------------------------------------------------------------------------
    async def route(self, request):
        """Every request but the websocket: the API (with or without /api/), else a file of the bundle."""
        path = request.match_info["path"]
        api_path = path[4:] if path.startswith("api/") else path
        if request.method == "GET":
            answer = self.get(api_path, request)
            if answer is not None:
                return answer
            file = (self.static / path).resolve()
            if path and file.is_file() and self.static in file.parents:
                return web.FileResponse(file)
        elif request.method == "POST":
            answer = await self.post(api_path, request)
            if answer is not None:
                return answer
        self.unknown.append(f"{request.method} /{path}")
        return web.json_response({"error": f"the test backend does not serve {request.method} /{path}"}, status=404)

    def get(self, path: str, request):
        j = web.json_response
        if path == "object_info":
            return j(self.object_info)
        if path.startswith("object_info/"):
            name = path.split("/", 1)[1]
            return j({name: self.object_info[name]} if name in self.object_info else {})
        if path == "extensions":
            return j([f"/extensions/{EXTENSION_NAME}/{p.relative_to(ROOT / 'js').as_posix()}"
                      for p in sorted((ROOT / "js").rglob("*.js"))])
        if path == "system_stats":
            return j(system_stats())
        if path == "settings":
            return j(self.settings)
        if path.startswith("settings/"):
            return j(self.settings.get(path.split("/", 1)[1]))
        if path == "users":
            return j({"storage": "server", "migrated": True})
        if path in ("userdata", "v2/userdata"):
            return j([])
        if path.startswith("userdata/"):
            name = path.split("/", 1)[1]
            if name in self.userdata:
                return web.Response(body=self.userdata[name])
            return web.Response(status=404)
        if path == "queue":
            return j({"queue_running": [], "queue_pending": []})
        if path == "prompt":
            return j({"exec_info": {"queue_remaining": 0}})
        if path in ("history", "embeddings"):
            return j({} if path == "history" else [])
        if path in ("models", "experiment/models"):
            if path == "models":
                return j(list(self.model_folders))
            return j([{"name": f, "folders": [f"models/{f}"]} for f in self.model_folders])
        for prefix in ("models/", "experiment/models/"):
            if path.startswith(prefix) and path[len(prefix):] in self.model_folders:
                files = self.models(path[len(prefix):])
                return j(files if prefix == "models/" else [{"name": f, "pathIndex": 0} for f in files])
        if path == "features":
            return j({"supports_preview_metadata": False, "max_upload_size": 100 * 1024 * 1024})
        if path == "user.css":
            return web.Response(text="", content_type="text/css")
        if path in ("i18n", "workflow_templates", "node_replacements", "global_subgraphs", "internal/folder_paths"):
            return j({})
        if path == "jobs":
            return j({"jobs": [], "pagination": {"offset": 0, "limit": 0, "total": 0, "has_more": False}})
        return None

    async def post(self, path: str, request):
        if path.startswith("settings"):
            body = await request.json()
            if path == "settings":
                self.settings.update(body)
            else:
                self.settings[path.split("/", 1)[1]] = body
            return web.json_response({})
        if path.startswith("userdata/"):
            self.userdata[path.split("/", 1)[1]] = await request.read()
            return web.json_response({})
        if path == "prompt":
            body = await request.json()
            self.prompts.append(body)
            return web.json_response({"prompt_id": uuid.uuid4().hex, "number": len(self.prompts), "node_errors": {}})
        if path in ("queue", "history", "interrupt", "free"):
            return web.json_response({})
        return None

    async def log(self, request):
        return web.json_response({"unknown": self.unknown, "prompts": self.prompts})

    def app(self) -> web.Application:
        async def index(request):
            return web.FileResponse(self.static / "index.html", headers={"Cache-Control": "no-store"})

        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/ws", self.ws)
        app.router.add_post("/test/emit", self.emit)
        app.router.add_get("/test/log", self.log)
        app.router.add_get("/", index)
        app.router.add_static(f"/extensions/{EXTENSION_NAME}/", ROOT / "js")
        app.router.add_route("*", "/{path:.*}", self.route)
        return app


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8199)
    parser.add_argument("--models-dir", type=Path, help="a models folder (diffusion_models/, text_encoders/, vae/)")
    parser.add_argument("--input-dir", type=Path, help="the input folder LoadImage lists")
    args = parser.parse_args(argv)
    web.run_app(Backend(args.models_dir, args.input_dir).app(), host="127.0.0.1", port=args.port, print=lambda *a: print(
        f"test backend on http://127.0.0.1:{args.port} ({platform.python_version()})", flush=True))
    return 0


if __name__ == "__main__":
    asyncio.set_event_loop(asyncio.new_event_loop())
    sys.exit(main())
