"""`zoetrope run WORKFLOW.json [--set NODE_ID.INPUT=VALUE ...] [--output-dir DIR]`: run a workflow headless.

A workflow comes in one of two formats. The API format ("prompt") maps node ids to {"class_type", "inputs"}, with
a linked input written ["origin id", output slot]. The UI format (what File > Save writes, and what workflows/
holds) lists nodes with positions, `widgets_values` and numbered links; `ui_to_api` converts it the way ComfyUI's
frontend does (graphToPrompt), from our node definitions alone:

- widgets take `widgets_values` slots in the order of the node's inputs (required, then optional); sockets (IMAGE,
  LATENT, ...) take none; an INT named seed / noise_seed (or declared control_after_generate) has one more slot
  right after it, the "control after generate" value, which is not sent;
- a linked input becomes ["origin id", slot], also for a widget converted to an input (it keeps its slot);
- muted (mode 2) and bypassed (mode 4) nodes are left out; a bypassed node's input of the same type stands in
  for its output; Reroute nodes are followed, a PrimitiveNode's value is written into the inputs it feeds, and
  Note / MarkdownNote nodes are ignored.

Then every node is checked (known type, links, types, ranges, VALIDATE_INPUTS) before anything runs, and the
nodes that feed an output node run in topological order.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("zoetrope")

MUTED, BYPASSED = 2, 4
NOTES = ("Note", "MarkdownNote")
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_NAMES = ("seed", "noise_seed")


class WorkflowError(ValueError):
    """A workflow that cannot run as given: the message names the node, what is wrong and what to do."""


# ---------------------------------------------------------------------------------------------------------------
# Node definitions

def node_classes() -> dict[str, type]:
    """The node types the standalone runner knows: ours and its small versions of a few core nodes."""
    from . import NODE_CLASS_MAPPINGS
    from .core import NODE_CLASS_MAPPINGS as CORE
    return {**CORE, **NODE_CLASS_MAPPINGS}


def display_name(class_type: str) -> str:
    from . import NODE_DISPLAY_NAME_MAPPINGS
    from .core import NODE_DISPLAY_NAME_MAPPINGS as CORE
    return NODE_DISPLAY_NAME_MAPPINGS.get(class_type) or CORE.get(class_type, class_type)


def input_specs(cls) -> list[tuple[str, Any, dict, bool]]:
    """(name, type, options, required) of every required then optional input, in declaration order."""
    types = cls.INPUT_TYPES()
    specs = []
    for section, required in (("required", True), ("optional", False)):
        for name, spec in (types.get(section) or {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, kind, options, required))
    return specs


def is_widget(kind, options: dict) -> bool:
    """Whether an input is a widget (it has a value on the node) rather than a socket only."""
    return (isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES) and not options.get("forceInput")


def widget_slots(cls) -> list[str | None]:
    """The meaning of each `widgets_values` slot of a node: the input name, or None for a slot that is not sent
    (the seed's control_after_generate value, an image upload button's value)."""
    slots: list[str | None] = []
    for name, kind, options, _ in input_specs(cls):
        if not is_widget(kind, options):
            continue
        slots.append(name)
        if (kind == "INT" and name in SEED_NAMES) or options.get("control_after_generate"):
            slots.append(None)
        if options.get("image_upload"):
            slots.append(None)
    return slots


def object_info(classes: dict[str, type] | None = None) -> dict[str, dict]:
    """Node definitions in the shape of ComfyUI's /object_info (server.py node_info), for a test backend that
    serves the real frontend without ComfyUI."""
    classes = node_classes() if classes is None else classes
    info = {}
    for name, cls in classes.items():
        types = cls.INPUT_TYPES()
        entry = {
            "input": types,
            "input_order": {section: list(inputs) for section, inputs in types.items()},
            "is_input_list": getattr(cls, "INPUT_IS_LIST", False),
            "output": list(cls.RETURN_TYPES),
            "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES))),
            "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES)),
            "name": name,
            "display_name": display_name(name),
            "description": getattr(cls, "DESCRIPTION", ""),
            "python_module": "custom_nodes.zoetrope" if name.startswith("Zoetrope") else "nodes",
            "category": getattr(cls, "CATEGORY", "sd"),
            "output_node": bool(getattr(cls, "OUTPUT_NODE", False)),
            "has_intermediate_output": False,
            "search_aliases": list(getattr(cls, "SEARCH_ALIASES", [])),
        }
        if hasattr(cls, "OUTPUT_TOOLTIPS"):
            entry["output_tooltips"] = list(cls.OUTPUT_TOOLTIPS)
        info[name] = entry
    return info


# ---------------------------------------------------------------------------------------------------------------
# UI format -> API format

def is_ui_format(workflow: dict) -> bool:
    return isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list)


def _links(workflow: dict) -> dict[int, tuple]:
    """link id -> (origin id, origin slot, target id, target slot, type), from 0.4 arrays or 1.0 objects."""
    out = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            out[link["id"]] = (str(link["origin_id"]), link["origin_slot"], str(link["target_id"]),
                               link["target_slot"], link.get("type"))
        elif isinstance(link, (list, tuple)) and len(link) >= 6:
            out[link[0]] = (str(link[1]), link[2], str(link[3]), link[4], link[5])
        else:
            raise WorkflowError(f"the workflow's links hold {link!r}, which is not a link [id, origin node, origin "
                                "slot, target node, target slot, type]; the file is damaged")
    return out


def _origin_note(node: dict) -> str:
    props = node.get("properties") or {}
    where = [f"{k} {props[k]!r}" for k in ("cnr_id", "aux_id") if props.get(k)]
    if props.get("cnr_id") == "comfy-core":
        return " (a core ComfyUI node that the standalone runner does not implement; run this workflow in ComfyUI)"
    if where:
        return (f" (it comes from another node pack: {', '.join(where)}; install that pack in ComfyUI and run the "
                "workflow there)")
    return " (no node pack Zoetrope knows provides it; run the workflow in ComfyUI with the pack that does)"


def ui_to_api(workflow: dict, classes: dict[str, type] | None = None) -> dict[str, dict]:
    """Convert a UI-format workflow to the API format, as ComfyUI's frontend does (see the module docstring)."""
    classes = node_classes() if classes is None else classes
    nodes = {str(n["id"]): n for n in workflow["nodes"]}
    links = _links(workflow)
    subgraphs = {g.get("id") for g in ((workflow.get("definitions") or {}).get("subgraphs") or [])}
    api, problems = {}, []

    def source(link_id, target: dict, name: str, seen=()):
        """What feeds a linked input: ("link", origin id, slot), ("value", v), or None (muted or unconnected)."""
        where = f"node {target['id']} ({target.get('type')}) input '{name}'"
        if link_id not in links:
            raise WorkflowError(f"{where} uses link {link_id}, which is not in the workflow's links: the link is "
                                "broken; reconnect the input in the editor")
        origin_id, slot, _, _, link_type = links[link_id]
        origin = nodes.get(origin_id)
        if origin is None:
            raise WorkflowError(f"{where} is linked (link {link_id}) to node {origin_id}, which is not in the "
                                "workflow: the link is broken; reconnect the input")
        if origin_id in seen:
            raise WorkflowError(f"{where}: reroutes or bypassed nodes form a loop at node {origin_id}")
        kind, mode = origin.get("type"), origin.get("mode", 0)
        if mode == MUTED:
            return None
        if kind == "PrimitiveNode":
            values = origin.get("widgets_values") or []
            if not values:
                raise WorkflowError(f"{where} comes from PrimitiveNode {origin_id}, which holds no value")
            return ("value", values[0])
        if kind == "Reroute" or mode == BYPASSED:
            upstream = _passthrough_input(origin, slot, link_type, kind == "Reroute")
            if upstream is None:
                return None
            return source(upstream, target, name, seen + (origin_id,))
        return ("link", origin_id, slot)

    for node_id, node in nodes.items():
        kind, mode = node.get("type"), node.get("mode", 0)
        if kind in NOTES or kind in ("Reroute", "PrimitiveNode") or mode in (MUTED, BYPASSED):
            continue
        cls = classes.get(kind)
        if cls is None:
            title = f" titled {node['title']!r}" if node.get("title") else ""
            if kind in subgraphs:
                problems.append(f"node {node_id}{title} is a subgraph, which the runner does not expand yet: unpack "
                                "it in the editor (right-click > Unpack Subgraph) and save again")
            else:
                problems.append(f"node {node_id}{title} is of type {kind!r}, which the runner does not have"
                                f"{_origin_note(node)}")
            continue
        slots = widget_slots(cls)
        values = node.get("widgets_values")
        inputs: dict[str, Any] = {}
        if isinstance(values, dict):
            inputs.update({k: v for k, v in values.items() if k in slots})
        elif values:
            if len(values) > len(slots):
                problems.append(f"node {node_id} ({kind}) has {len(values)} widget values but {kind} has {len(slots)} "
                                "widget slots: the workflow was saved with another version of this node")
                continue
            inputs.update({name: v for name, v in zip(slots, values) if name is not None})
        for socket in node.get("inputs") or []:
            link_id = socket.get("link")
            name = (socket.get("widget") or {}).get("name") or socket.get("name")
            if link_id is None:
                continue
            try:
                found = source(link_id, node, name)
            except WorkflowError as e:
                problems.append(str(e))
                continue
            if found is None:
                inputs.pop(name, None)
            elif found[0] == "value":
                inputs[name] = found[1]
            else:
                inputs[name] = [found[1], found[2]]
        api[node_id] = {"inputs": inputs, "class_type": kind,
                        "_meta": {"title": node.get("title") or display_name(kind)}}
    if problems:
        raise WorkflowError("the workflow cannot be converted:\n  " + "\n  ".join(problems))
    return api


def _passthrough_input(node: dict, slot: int, link_type, reroute: bool):
    """The link that stands in for output `slot` of a Reroute or a bypassed node: a Reroute's only input; for a
    bypassed node the input at the same index if its type matches, else the first input of that type."""
    inputs = node.get("inputs") or []
    if reroute:
        return inputs[0].get("link") if inputs else None
    outputs = node.get("outputs") or []
    wanted = outputs[slot].get("type") if slot < len(outputs) else link_type
    if slot < len(inputs) and inputs[slot].get("type") == wanted and inputs[slot].get("link") is not None:
        return inputs[slot]["link"]
    for socket in inputs:
        if socket.get("type") == wanted and socket.get("link") is not None:
            return socket["link"]
    return None


# ---------------------------------------------------------------------------------------------------------------
# Overrides

def parse_set(items: list[str]) -> list[tuple[str, str, Any]]:
    """--set NODE_ID.INPUT=VALUE: VALUE is read as JSON when it is JSON (numbers, true, "text"), else as text."""
    out = []
    for item in items:
        target, eq, raw = item.partition("=")
        node_id, dot, name = target.partition(".")
        if not eq or not dot or not node_id or not name:
            raise WorkflowError(f"--set {item!r} is not NODE_ID.INPUT=VALUE (e.g. --set 7.seed=42 or --set "
                                "3.text=\"a red circle\")")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        out.append((node_id.strip(), name.strip(), value))
    return out


def apply_overrides(api: dict, overrides: list[tuple[str, str, Any]], classes: dict[str, type],
                    workflow: dict | None = None) -> None:
    """Set inputs of the API prompt; with the UI workflow given, also its widget values, so that the workflow
    embedded in the saved video is the one that made it."""
    ui_nodes = {str(n["id"]): n for n in workflow["nodes"]} if workflow is not None else {}
    for node_id, name, value in overrides:
        if node_id not in api:
            raise WorkflowError(f"--set {node_id}.{name}: there is no node {node_id} to run (nodes: "
                                f"{', '.join(sorted(api, key=_id_order))})")
        cls = classes[api[node_id]["class_type"]]
        names = [spec[0] for spec in input_specs(cls)]
        if name not in names:
            raise WorkflowError(f"--set {node_id}.{name}: {api[node_id]['class_type']} has no input {name!r} (its "
                                f"inputs: {', '.join(names)})")
        api[node_id]["inputs"][name] = value
        node = ui_nodes.get(node_id)
        if node is not None and isinstance(node.get("widgets_values"), list):
            slots = widget_slots(cls)
            if name in slots and slots.index(name) < len(node["widgets_values"]):
                node["widgets_values"][slots.index(name)] = value


def _id_order(node_id: str):
    return (0, int(node_id), "") if node_id.isdigit() else (1, 0, node_id)


# ---------------------------------------------------------------------------------------------------------------
# Validation

def validate(api: dict, classes: dict[str, type] | None = None) -> list[str]:
    """Check every node before anything runs; raises WorkflowError listing all problems. Widgets a workflow saved
    by an older version of a node lacks get their defaults (in place). Returns the output nodes."""
    classes = node_classes() if classes is None else classes
    problems = []
    for node_id in sorted(api, key=_id_order):
        node = api[node_id]
        kind = node.get("class_type")
        label = f"node {node_id} ({kind})"
        cls = classes.get(kind)
        if cls is None:
            title = (node.get("_meta") or {}).get("title")
            problems.append(f"node {node_id}{f' titled {title!r}' if title and title != kind else ''} is of type "
                            f"{kind!r}, which the runner does not have (not a Zoetrope node, nor one of the core "
                            f"nodes it implements: {', '.join(k for k in classes if not k.startswith('Zoetrope'))})")
            continue
        inputs = node.get("inputs") or {}
        custom = _validate_inputs_args(cls)
        for name, kind_in, options, required in input_specs(cls):
            if name not in inputs:
                if required and not is_widget(kind_in, options):
                    problems.append(f"{label} needs input '{name}', which is not connected")
                elif required:
                    inputs[name] = default_value(kind_in, options)
                    log.info("%s: %s not given, using its default %r", label, name, inputs[name])
                continue
            value = inputs[name]
            if _is_link(value):
                problems.extend(_check_link(api, classes, label, name, kind_in, value))
            elif not is_widget(kind_in, options):
                problems.append(f"{label} input '{name}' takes a {kind_in} from another node, not the value {value!r}")
            elif name not in custom:
                problem = check_value(kind_in, options, value)
                if problem:
                    problems.append(f"{label} {name}: {problem}")
        if custom:
            args = {k: inputs[k] for k in custom if k in inputs and not _is_link(inputs[k])}
            if len(args) == len(custom):
                result = cls.VALIDATE_INPUTS(**args)
                if result is not True:
                    problems.append(f"{label}: {result}")
    outputs = [i for i in sorted(api, key=_id_order) if getattr(classes.get(api[i].get("class_type")), "OUTPUT_NODE",
                                                                  False)]
    if not problems and not outputs:
        problems.append("the workflow has no output node (such as ZoetropeSaveVideo), so running it would make "
                        "nothing; add one")
    if problems:
        raise WorkflowError("the workflow is not valid:\n  " + "\n  ".join(problems))
    return outputs


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _validate_inputs_args(cls) -> list[str]:
    import inspect
    fn = getattr(cls, "VALIDATE_INPUTS", None)
    if fn is None:
        return []
    return [p for p in inspect.signature(fn).parameters if p not in ("cls", "self", "input_types")]


def _check_link(api, classes, label: str, name: str, kind, value) -> list[str]:
    origin_id, slot = value
    origin = api.get(origin_id)
    if origin is None:
        return [f"{label} input '{name}' is linked to node {origin_id}, which is not in the workflow (deleted, muted "
                "or bypassed): the link is broken; reconnect the input"]
    origin_cls = classes.get(origin.get("class_type"))
    if origin_cls is None:
        return []                       # reported as an unknown type already
    returns = origin_cls.RETURN_TYPES
    if not 0 <= slot < len(returns):
        return [f"{label} input '{name}' is linked to output {slot} of node {origin_id} ({origin['class_type']}), "
                f"which has {len(returns)} outputs: the link is broken; reconnect the input"]
    produced = returns[slot]
    expected = "COMBO" if isinstance(kind, (list, tuple)) else kind
    if "*" in (produced, expected) or produced == expected or (expected == "COMBO" and isinstance(produced, list)):
        return []
    return [f"{label} input '{name}' takes {expected} but is linked to a {produced} (output {slot} of node "
            f"{origin_id}, {origin['class_type']}): connect a {expected}"]


def default_value(kind, options: dict):
    """A widget's value when a workflow saved by an older version of the node lacks it."""
    if "default" in options:
        return options["default"]
    if isinstance(kind, (list, tuple)):
        return kind[0] if kind else None
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


def check_value(kind, options: dict, value) -> str | None:
    """Why a widget value does not fit its input (type, range, choices), or None when it does."""
    if isinstance(kind, (list, tuple)) or kind == "COMBO":
        choices = list(kind) if isinstance(kind, (list, tuple)) else options.get("options", [])
        if value not in choices:
            return f"{value!r} is not one of the choices {', '.join(map(repr, choices[:12]))}"
        return None
    if kind == "INT":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            return f"{value!r} is not a whole number"
    elif kind == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"{value!r} is not a number"
    elif kind == "STRING":
        return None if isinstance(value, str) else f"{value!r} is not text"
    elif kind == "BOOLEAN":
        return None if isinstance(value, bool) else f"{value!r} is not true or false"
    if "min" in options and value < options["min"]:
        return f"{value} is below the minimum {options['min']}"
    if "max" in options and value > options["max"]:
        return f"{value} is above the maximum {options['max']}"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Execution

def execution_order(api: dict, outputs: list[str]) -> list[str]:
    """The nodes the outputs depend on, each after the nodes that feed it (ids in order among equals)."""
    needed, stack = set(), list(outputs)
    while stack:
        node_id = stack.pop()
        if node_id in needed:
            continue
        needed.add(node_id)
        stack.extend(v[0] for v in api[node_id]["inputs"].values() if _is_link(v))
    deps = {n: {v[0] for v in api[n]["inputs"].values() if _is_link(v)} for n in needed}
    order, done = [], set()
    while len(order) < len(needed):
        ready = sorted((n for n in needed if n not in done and deps[n] <= done), key=_id_order)
        if not ready:
            loop = sorted(needed - done, key=_id_order)
            raise WorkflowError(f"nodes {', '.join(loop)} feed each other in a loop; a workflow must flow one way")
        order.append(ready[0])
        done.add(ready[0])
    return order


def execute(api: dict, classes: dict[str, type] | None = None, extra_pnginfo: dict | None = None,
            progress: bool = True) -> dict[str, dict]:
    """Run a valid API prompt. Returns the `ui` dict of every node that returned one, by node id."""
    import torch
    from tqdm import tqdm

    from . import host
    classes = node_classes() if classes is None else classes
    outputs = validate(api, classes)
    order = execution_order(api, outputs)
    results: dict[str, tuple] = {}
    uis: dict[str, dict] = {}
    bar = tqdm(order, desc="workflow", unit="node", dynamic_ncols=True, disable=not progress)
    with torch.inference_mode():
        for node_id in bar:
            node = api[node_id]
            kind = node["class_type"]
            bar.set_postfix_str(f"{node_id} {kind}")
            cls = classes[kind]
            kwargs = {}
            for name, value in node["inputs"].items():
                kwargs[name] = results[value[0]][value[1]] if _is_link(value) else value
            hidden = cls.INPUT_TYPES().get("hidden") or {}
            for name, what in hidden.items():
                kwargs[name] = {"PROMPT": api, "EXTRA_PNGINFO": extra_pnginfo, "UNIQUE_ID": node_id}.get(what)
            try:
                out = getattr(cls(), cls.FUNCTION)(**kwargs)
            except (host.Interrupted, KeyboardInterrupt):
                raise
            except Exception as e:
                raise NodeError(node_id, kind, e) from e
            if isinstance(out, dict):
                if out.get("ui"):
                    uis[node_id] = out["ui"]
                out = tuple(out.get("result") or ())
            results[node_id] = tuple(out or ())
    bar.close()
    return uis


class NodeError(RuntimeError):
    """A node failed while running; keeps the original exception as its cause."""

    def __init__(self, node_id: str, kind: str, error: Exception):
        super().__init__(f"node {node_id} ({kind}) failed: {error}")
        self.node_id, self.kind, self.error = node_id, kind, error


def run_workflow(workflow: dict, overrides: list[str] = (), output_dir=None, models_dir=None, input_dir=None,
                 progress: bool = True) -> dict[str, dict]:
    """Convert (if needed), override, validate and run a workflow in the standalone host."""
    import copy

    from . import host
    host.configure(standalone=True, output_dir=output_dir, models_dir=models_dir, input_dir=input_dir)
    classes = node_classes()
    if is_ui_format(workflow):
        workflow = copy.deepcopy(workflow)
        api = ui_to_api(workflow, classes)
        extra = {"workflow": workflow}
    elif isinstance(workflow, dict) and workflow and all(isinstance(v, dict) and "class_type" in v
                                                         for v in workflow.values()):
        api = copy.deepcopy(workflow)
        extra = {}
    else:
        raise WorkflowError("this is not a ComfyUI workflow: expected the UI format (with 'nodes' and 'links') or "
                            "the API format (node ids mapping to {'class_type', 'inputs'})")
    apply_overrides(api, parse_set(list(overrides)), classes, workflow if extra else None)
    return execute(api, classes, extra, progress=progress)


def saved_files(uis: dict[str, dict], output_dir: Path) -> list[Path]:
    files = []
    for ui in uis.values():
        for item in ui.get("images") or []:
            files.append(output_dir / item.get("subfolder", "") / item["filename"])
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="zoetrope run", description="Run a ComfyUI workflow (UI or API format) made "
                                 "of Zoetrope nodes, without ComfyUI.")
    ap.add_argument("workflow", help="a workflow .json (e.g. one of the pack's workflows/)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="NODE_ID.INPUT=VALUE",
                    help="change an input before running, e.g. --set 6.text=\"a blue square\" --set 9.seed=7; a "
                         "loader's file may be given as a path")
    ap.add_argument("--output-dir", default="output", help="where save nodes write (default: %(default)s)")
    ap.add_argument("--models-dir", default=None, help="a models folder with diffusion_models/, text_encoders/, "
                    "vae/ (default: $ZOETROPE_MODELS or ./models)")
    ap.add_argument("--input-dir", default=None, help="where LoadImage looks (default: ./input)")
    args = ap.parse_args(argv)
    path = Path(args.workflow)
    try:
        workflow = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        print(f"error: no workflow file {path}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"error: {path} is not JSON ({e})", file=sys.stderr)
        return 2
    try:
        uis = run_workflow(workflow, args.overrides, args.output_dir, args.models_dir, args.input_dir)
    except WorkflowError as e:
        print(f"error: {path.name}: {e}", file=sys.stderr)
        return 2
    except NodeError as e:
        print(f"error: {path.name}: {e}", file=sys.stderr)
        return 1
    for f in saved_files(uis, Path(args.output_dir).absolute()):
        print(f"wrote {f}")
    return 0
