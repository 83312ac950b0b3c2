"""Developer tooling shared by the tests, the benchmark, the demo and the load test (never imported by the nodes):
``comfy_env`` (import ComfyUI in-process; the one import identity), ``comfy_server`` (a real server with this pack),
``comfy_api_client`` (HTTP + websocket client), ``api_graphs`` (the exemplar API graph), ``workflows`` (the example
workflows' builder, node schemas from ``object_info.json``), ``workflow_checks`` (workflow files against
``/object_info``) and ``models`` (tiny models, the exact model and ``counting_clone``). Event names and routes:
``comfyui_nested_diffusion.protocol``."""
