"""ComfyUI node classes (thin: they translate widgets into pipeline calls)."""
NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
